"""Logit-based methods (issue 7): KD with logit standardization, DKD and DIST.

Each loss is checked on small fixed tensors against a value worked out here with plain Python
arithmetic (``math`` on lists, not the modules' helpers), temperature, reductions and weights
included; then each method trains a few epochs on digits.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from distill.base import Batch, MethodContext, ModelOutput, method_class
from tests.conftest import train_student_on_digits


STUDENT = [[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, -1.0], [2.0, -1.0, 0.0, 1.0]]
TEACHER = [[2.0, 1.0, 0.0, 4.0], [1.0, 0.0, 0.0, 0.0], [0.0, 3.0, 1.0, 1.0]]
LABELS = [3, 0, 2]


def build(name: str, **overrides: Any):
    params = {key: spec["default"] for key, spec in method_class(name).METHOD["params"].items()}
    params.update(overrides)
    return method_class(name)(params, MethodContext(num_classes=4, teacher_tap_shapes={}, student_tap_shapes={}))


def run_loss(method, student=STUDENT, teacher=TEACHER, labels=LABELS, epoch: int = 0) -> dict[str, float]:
    terms = method.loss(ModelOutput(torch.tensor(student, dtype=torch.float64)),
                        ModelOutput(torch.tensor(teacher, dtype=torch.float64)),
                        Batch(torch.zeros(len(labels)), torch.tensor(labels), epoch))
    return {key: value.item() for key, value in terms.items()}


# --- plain-Python references ------------------------------------------------------------------------

def softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    """KL(p || q) = sum p log(p / q)."""
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def cross_entropy(rows: list[list[float]], labels: list[int]) -> float:
    return sum(-math.log(softmax(row)[y]) for row, y in zip(rows, labels)) / len(rows)


def pearson(a: list[float], b: list[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    da, db = [x - ma for x in a], [x - mb for x in b]
    return sum(x * y for x, y in zip(da, db)) / (math.sqrt(sum(x * x for x in da)) * math.sqrt(sum(y * y for y in db)))


# --- the METHOD declarations ------------------------------------------------------------------------

def test_defaults_follow_the_released_code() -> None:
    def defaults(name: str) -> dict[str, Any]:
        return {key: spec["default"] for key, spec in method_class(name).METHOD["params"].items()}

    assert defaults("kd") == {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9, "logit_standardization": False}
    assert defaults("dkd") == {"temperature": 4.0, "alpha": 1.0, "beta": 8.0, "ce_weight": 1.0, "warmup_epochs": 20}
    assert defaults("dist") == {"temperature": 4.0, "beta": 1.0, "gamma": 1.0, "ce_weight": 1.0}


# --- KD with logit standardization ------------------------------------------------------------------

def zscore(row: list[float]) -> list[float]:
    mean = sum(row) / len(row)
    unbiased_std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
    return [(v - mean) / (1e-7 + unbiased_std) for v in row]


def standardized_kd(student: list[list[float]], teacher: list[list[float]], temperature: float) -> float:
    per_sample = [kl(softmax([v / temperature for v in zscore(t)]), softmax([v / temperature for v in zscore(s)]))
                  for s, t in zip(student, teacher)]
    return temperature**2 * sum(per_sample) / len(per_sample)


def test_logit_standardization_z_scores_with_the_unbiased_std_before_the_temperature() -> None:
    # A hand-checkable sample: student [0, 3] and teacher [0, 1] both z-score to [-1/sqrt2, 1/sqrt2]
    # (unbiased std of two values d apart is d/sqrt2), so KD is 0 whatever their scale.
    assert run_loss(build("kd", logit_standardization=True), [[0.0, 3.0]], [[0.0, 1.0]], [1])["kd"] == pytest.approx(0.0, abs=1e-12)
    # Student [0, 1, 2]: unbiased std 1 -> z = [-1, 0, 1]; teacher [0, 0, 3]: mean 1, std sqrt3 ->
    # z = [-1/sqrt3, -1/sqrt3, 2/sqrt3]. At T = 1: log p_s = z_s - 2.40761 + 1 = [-2.40761, -1.40761,
    # -0.40761]; p_t = [0.13069, 0.13069, 0.73863], log p_t = [-2.03500, -2.03500, -0.30297];
    # KL = .13069 x 0.37261 + .13069 x (-0.62739) + .73863 x 0.10464 = 0.04401; weight 9, T^2 = 1.
    expected = kl(softmax([-1 / math.sqrt(3), -1 / math.sqrt(3), 2 / math.sqrt(3)]), softmax([-1.0, 0.0, 1.0]))
    assert expected == pytest.approx(0.044010, abs=1e-6)
    terms = run_loss(build("kd", logit_standardization=True, temperature=1.0, kd_weight=9.0, ce_weight=1.0),
                     [[0.0, 1.0, 2.0]], [[0.0, 0.0, 3.0]], [2])
    assert terms["kd"] == pytest.approx(9.0 * expected, rel=1e-6)
    assert terms["ce"] == pytest.approx(cross_entropy([[0.0, 1.0, 2.0]], [2]), rel=1e-9)  # raw logits, not z-scores


def test_logit_standardized_kd_matches_the_reference_on_a_batch() -> None:
    # T = 2 (their CIFAR base temperature), kd_weight 9, ce_weight 1: 9 x T^2 x batch-mean KL of z-scores.
    terms = run_loss(build("kd", logit_standardization=True, temperature=2.0, kd_weight=9.0, ce_weight=1.0))
    assert list(terms) == ["ce", "kd"]
    assert terms["kd"] == pytest.approx(9.0 * standardized_kd(STUDENT, TEACHER, 2.0), rel=1e-6)
    assert terms["ce"] == pytest.approx(cross_entropy(STUDENT, LABELS), rel=1e-9)


def test_logit_standardized_kd_ignores_each_samples_shift_and_scale() -> None:
    method = build("kd", logit_standardization=True, temperature=2.0)
    before = run_loss(method)["kd"]
    moved_student = [[3.0 * v - 7.0 for v in STUDENT[0]], [0.5 * v + 2.0 for v in STUDENT[1]], STUDENT[2]]
    moved_teacher = [TEACHER[0], [10.0 * v + 1.0 for v in TEACHER[1]], [v - 4.0 for v in TEACHER[2]]]
    assert before > 0.01
    assert run_loss(method, moved_student, moved_teacher)["kd"] == pytest.approx(before, rel=1e-5)
    # Without standardization the same change moves the loss.
    plain = build("kd", temperature=2.0)
    assert run_loss(plain, moved_student, moved_teacher)["kd"] != pytest.approx(run_loss(plain)["kd"], rel=1e-2)


def test_kd_without_the_new_key_is_todays_kd() -> None:
    # T = 2, 0.9 / 0.1 on the first KD test's logits (tests/test_distill.py): KD 0.9 x 0.79716, CE 0.1 x 0.75311.
    params = {"temperature": 2.0, "ce_weight": 0.1, "kd_weight": 0.9}
    old = method_class("kd")(params, MethodContext(num_classes=3, teacher_tap_shapes={}, student_tap_shapes={}))
    student, teacher, labels = [[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]], [[3.0, 2.0, 1.0], [1.0, 0.0, -1.0]], [2, 1]
    for method in (old, build("kd", temperature=2.0, logit_standardization=False)):
        terms = run_loss(method, student, teacher, labels)
        assert terms["kd"] == pytest.approx(0.9 * 0.797159, abs=1e-5)
        assert terms["ce"] == pytest.approx(0.1 * 0.753105, abs=1e-5)


# --- DKD --------------------------------------------------------------------------------------------

def dkd_reference(student: list[list[float]], teacher: list[list[float]], labels: list[int],
                  temperature: float) -> tuple[float, float]:
    """(TCKD, NCKD) with the non-target distribution taken exactly (the true class dropped)."""
    tckd = nckd = 0.0
    for s, t, y in zip(student, teacher, labels):
        p_s, p_t = softmax([v / temperature for v in s]), softmax([v / temperature for v in t])
        tckd += kl([p_t[y], 1.0 - p_t[y]], [p_s[y], 1.0 - p_s[y]])
        others_s = softmax([v / temperature for k, v in enumerate(s) if k != y])
        others_t = softmax([v / temperature for k, v in enumerate(t) if k != y])
        nckd += kl(others_t, others_s)
    scale = temperature**2 / len(labels)
    return tckd * scale, nckd * scale


def test_dkd_on_two_classes_is_kd_with_an_empty_nckd() -> None:
    # Two classes, label 0, T = 1: student [0, 0] gives p_s = [.5, .5]; teacher [log 3, 0] gives
    # p_t = [.75, .25]. TCKD = .75 log 1.5 + .25 log .5 = 0.130812; the one non-target class has
    # probability 1 in both, so NCKD = 0. At epoch 19 the warm-up is over: alpha 2 -> 0.261624.
    terms = run_loss(build("dkd", temperature=1.0, alpha=2.0, beta=8.0), [[0.0, 0.0]], [[math.log(3.0), 0.0]], [0], epoch=19)
    assert terms["tckd"] == pytest.approx(2.0 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5)), abs=1e-9)
    assert terms["tckd"] == pytest.approx(0.261624, abs=1e-6)
    assert terms["nckd"] == pytest.approx(0.0, abs=1e-12)


def test_dkd_matches_the_reference_with_temperature_sum_over_batch_and_weights() -> None:
    tckd, nckd = dkd_reference(STUDENT, TEACHER, LABELS, 4.0)
    assert (tckd, nckd) == (pytest.approx(0.0819688, abs=1e-6), pytest.approx(1.6012180, abs=1e-6))
    terms = run_loss(build("dkd", alpha=1.5, beta=8.0, ce_weight=0.5), epoch=30)
    assert list(terms) == ["ce", "tckd", "nckd"]
    assert terms["tckd"] == pytest.approx(1.5 * tckd, rel=1e-6)
    assert terms["nckd"] == pytest.approx(8.0 * nckd, rel=1e-6)
    assert terms["ce"] == pytest.approx(0.5 * cross_entropy(STUDENT, LABELS), rel=1e-9)


@pytest.mark.parametrize(("epoch", "factor"), [(0, 1 / 20), (10, 11 / 20), (19, 1.0), (25, 1.0)])
def test_dkd_warms_up_like_mdistillers_one_based_epoch(epoch: int, factor: float) -> None:
    # mdistiller passes epoch 1 for the first epoch: min(1 / 20, 1). kdbench's epoch 0 is that epoch.
    tckd, nckd = dkd_reference(STUDENT, TEACHER, LABELS, 4.0)
    terms = run_loss(build("dkd"), epoch=epoch)
    assert terms["tckd"] == pytest.approx(factor * 1.0 * tckd, rel=1e-6)
    assert terms["nckd"] == pytest.approx(factor * 8.0 * nckd, rel=1e-6)
    assert terms["ce"] == pytest.approx(cross_entropy(STUDENT, LABELS), rel=1e-9)  # the CE is not warmed up


# --- DIST -------------------------------------------------------------------------------------------

def dist_reference(student: list[list[float]], teacher: list[list[float]], tau: float) -> tuple[float, float]:
    y_s = [softmax([v / tau for v in row]) for row in student]
    y_t = [softmax([v / tau for v in row]) for row in teacher]
    inter = 1.0 - sum(pearson(a, b) for a, b in zip(y_s, y_t)) / len(y_s)
    columns = range(len(y_s[0]))
    intra = 1.0 - sum(pearson([r[c] for r in y_s], [r[c] for r in y_t]) for c in columns) / len(columns)
    return tau**2 * inter, tau**2 * intra


def test_dist_on_a_hand_worked_pair() -> None:
    # tau = 1, two samples, two classes. Any two-class probability row centres to [d, -d], so each
    # sample's Pearson is sign(d_s x d_t): sample 1 (s favours class 0, t favours class 0) +1, sample 2
    # (s favours 0, t favours 1) -1: inter = 1 - (1 - 1) / 2 = 1, x beta 2. Per class, two samples also
    # give +-1: see below, intra = 1 - (-1 - 1) / 2 = 2, x gamma 0.5.
    student, teacher = [[1.0, 0.0], [2.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]
    terms = run_loss(build("dist", temperature=1.0, beta=2.0, gamma=0.5, ce_weight=0.0), student, teacher, [0, 1])
    assert terms["inter"] == pytest.approx(2.0 * 1.0, abs=1e-6)
    # class 0: s = [sigmoid(1), sigmoid(2)] rises, t = [sigmoid(1), sigmoid(-1)] falls -> -1; class 1 mirrors it -> -1.
    assert terms["intra"] == pytest.approx(0.5 * 2.0, abs=1e-6)
    assert terms["ce"] == 0.0


def test_dist_matches_the_reference_with_tau_squared_and_weights() -> None:
    inter, intra = dist_reference(STUDENT, TEACHER, 4.0)
    assert (inter, intra) == (pytest.approx(17.6948941, abs=1e-6), pytest.approx(18.4153731, abs=1e-6))
    terms = run_loss(build("dist", beta=2.0, gamma=0.5, ce_weight=1.0))
    assert list(terms) == ["ce", "inter", "intra"]
    assert terms["inter"] == pytest.approx(2.0 * inter, rel=1e-6)
    assert terms["intra"] == pytest.approx(0.5 * intra, rel=1e-6)
    assert terms["ce"] == pytest.approx(cross_entropy(STUDENT, LABELS), rel=1e-9)


def test_dist_is_zero_for_a_student_equal_to_its_teacher_and_finite_on_one_sample() -> None:
    # Not exactly 0: the 1e-8 sits beside norms of centred tau=4 probabilities (~0.01-0.1), then x tau^2.
    terms = run_loss(build("dist"), TEACHER, TEACHER)
    assert terms["inter"] == pytest.approx(0.0, abs=1e-4) and terms["intra"] == pytest.approx(0.0, abs=1e-4)
    # One sample: each class column is constant, the authors' 1e-8 makes its Pearson 0 (intra = tau^2), not NaN.
    one = run_loss(build("dist"), STUDENT[:1], TEACHER[:1], LABELS[:1])
    assert one["intra"] == pytest.approx(16.0, abs=1e-6)


# --- training on digits -----------------------------------------------------------------------------

@pytest.mark.parametrize(("method", "params", "terms"), [
    ("kd", {"logit_standardization": True, "temperature": 2.0, "kd_weight": 9.0, "ce_weight": 1.0}, ["ce", "kd"]),
    ("dkd", None, ["ce", "tckd", "nckd"]),
    ("dist", None, ["ce", "inter", "intra"]),
])
def test_method_trains_on_digits_and_logs_its_terms(tiny_in_process, restore_torch_threads, tmp_path: Path,
                                                    method: str, params: dict[str, Any] | None, terms: list[str]) -> None:
    log = train_student_on_digits(tiny_in_process, tmp_path, method, params, epochs=3)
    epochs = log["epochs"]
    assert len(epochs) == 3
    for entry in epochs:
        assert list(entry["terms"]) == terms
        assert all(math.isfinite(value) for value in entry["terms"].values())
        assert math.isfinite(entry["train_loss"])
        assert entry["train_loss"] == pytest.approx(sum(entry["terms"].values()))
    if method == "dkd":
        # The DKD weight grows 1/20, 2/20, 3/20 over these epochs, so the summed loss may rise; with
        # the ramp divided out of the logged terms (which checks it was applied per epoch) it falls.
        unramped = [entry["terms"]["ce"] + (entry["terms"]["tckd"] + entry["terms"]["nckd"]) * 20 / (e + 1)
                    for e, entry in enumerate(epochs)]
        assert unramped[-1] < unramped[0]
    else:
        assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]


def test_dkd_refuses_a_teacher_of_other_classes_than_the_data_sets() -> None:
    from distill.base import MethodConfigError

    dkd = method_class("dkd")
    declared = {key: spec["default"] for key, spec in dkd.METHOD["params"].items()}
    other = MethodContext(num_classes=10, teacher_tap_shapes={"fc": (100,)}, student_tap_shapes={"fc": (10,)})
    with pytest.raises(MethodConfigError) as refused:
        dkd.check(declared, other)
    assert refused.value.key == "teacher" and "100 classes" in str(refused.value)
    dkd.check(declared, MethodContext(num_classes=10, teacher_tap_shapes={"fc": (10,)}, student_tap_shapes={"fc": (10,)}))
