"""The feature and relational methods (AT, SP, PKT, RKD, CC): each loss against numbers worked out in
the test with plain arithmetic, the tap checks, the METHOD literals, and a short training run each."""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from distill.base import Batch, MethodConfigError, MethodContext, ModelOutput, method_class
from tests.conftest import train_student_on_digits

METHOD_TERMS = {
    "at": {"ce", "at"},
    "sp": {"ce", "sp"},
    "pkt": {"ce", "pkt"},
    "rkd": {"ce", "rkd_distance", "rkd_angle"},
    "cc": {"ce", "cc"},
}
LOG_3 = math.log(3.0)  # cross-entropy of all-zero logits over 3 classes


def defaults(name: str, **overrides: object) -> dict[str, object]:
    params = {key: spec["default"] for key, spec in method_class(name).METHOD["params"].items()}
    params.update(overrides)
    return params


def context(teacher: dict[str, tuple[int, ...]], student: dict[str, tuple[int, ...]]) -> MethodContext:
    return MethodContext(num_classes=3, teacher_tap_shapes=teacher, student_tap_shapes=student)


def batch(size: int) -> Batch:
    return Batch(torch.zeros(size, 1, 8, 8), torch.zeros(size, dtype=torch.long))


def outputs(features: dict[str, torch.Tensor]) -> ModelOutput:
    size = next(iter(features.values())).shape[0]
    return ModelOutput(torch.zeros(size, 3, dtype=torch.float64), features)


# --- the METHOD declarations (tests/test_distill.py checks every literal; this, RepDistiller's weights) ---

@pytest.mark.parametrize("name", sorted(METHOD_TERMS))
def test_cross_entropy_keeps_repdistillers_weight(name: str) -> None:
    assert method_class(name).METHOD["params"]["ce_weight"]["default"] == 1.0  # -r 1 (and -a 0: no KD term)


# --- losses against worked numbers ----------------------------------------------------------------------

def test_at_sums_pairwise_attention_terms_pooling_the_larger_map() -> None:
    # Pair 1: student (2, 1, 2) with channels [1, 2] and [3, 0]: mean of squares [5, 2], unit [5, 2]/sqrt 29.
    # Teacher (1, 2, 4) [[1, 1, 2, 2], [1, 1, 2, 2]] pools (2x2 blocks) to [1, 2] -> [1, 4]/sqrt 17.
    # Pair 2: student [3, 4] -> [9, 16]/sqrt 337; teacher [1, 0] -> [1, 0]. Each pair: mean over 2 positions,
    # 0.41451 + 0.50975, summed, x 1000 = 924.248.
    student = {"a": torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]], dtype=torch.float64),
               "b": torch.tensor([[[[3.0, 4.0]]]], dtype=torch.float64)}
    teacher = {"x": torch.tensor([[[[1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0]]]], dtype=torch.float64),
               "y": torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64)}
    pair_1 = ((5 / math.sqrt(29) - 1 / math.sqrt(17)) ** 2 + (2 / math.sqrt(29) - 4 / math.sqrt(17)) ** 2) / 2
    pair_2 = ((9 / math.sqrt(337) - 1) ** 2 + (16 / math.sqrt(337)) ** 2) / 2
    method = method_class("at")(
        defaults("at", teacher_taps=["x", "y"], student_taps=["a", "b"], ce_weight=0.5),
        context({"x": (1, 2, 4), "y": (1, 1, 2)}, {"a": (2, 1, 2), "b": (1, 1, 2)}),
    )
    assert method.teacher_taps == ("x", "y") and method.student_taps == ("a", "b")
    terms = method.loss(outputs(student), outputs(teacher), batch(1))
    assert set(terms) == {"ce", "at"}
    assert terms["at"].item() == pytest.approx(1000 * (pair_1 + pair_2), rel=1e-9)
    assert terms["at"].item() == pytest.approx(924.24821, rel=1e-6)
    assert terms["ce"].item() == pytest.approx(0.5 * LOG_3, rel=1e-9)


def test_sp_is_squared_frobenius_distance_of_row_normalised_gram_matrices_over_n_squared() -> None:
    # Student rows [1, 0], [1, 1]: G_s = [[1, 1], [1, 2]], rows [1, 1]/sqrt 2 and [1, 2]/sqrt 5.
    # Teacher rows [1, 0], [0, 1]: G_t = I. Row 1 gives 2 - sqrt 2, row 2 gives 2 - 4/sqrt 5; sum / N^2 = / 4,
    # x 3000 = 597.699.
    student = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64).view(2, 2, 1, 1)
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64).view(2, 1, 2, 1)
    expected = 3000 * ((2 - math.sqrt(2)) + (2 - 4 / math.sqrt(5))) / 4
    method = method_class("sp")(defaults("sp"), context({"layer3": (1, 2, 1)}, {"layer3": (2, 1, 1)}))
    terms = method.loss(outputs({"layer3": student}), outputs({"layer3": teacher}), batch(2))
    assert set(terms) == {"ce", "sp"}
    assert terms["sp"].item() == pytest.approx(expected, rel=1e-9)
    assert terms["sp"].item() == pytest.approx(597.69904, rel=1e-6)
    assert terms["ce"].item() == pytest.approx(LOG_3, rel=1e-9)


def test_pkt_is_mean_over_pairs_of_kl_terms_of_cosine_kernels() -> None:
    # Unit vectors divided by (1 + eps) have cosine n = 1/(1 + eps)^2 with themselves.
    # Student [1, 0], [0, 1]: kernel rows ((n+1)/2, 1/2) -> p_s = (d, o) with d = (n+1)/2 / ((n+1)/2 + 1/2).
    # Teacher [1, 0], [1, 0]: every kernel entry (n+1)/2, so p_t = 1/2 everywhere.
    # Both rows give 1/2 log((1/2+eps)/(d+eps)) + 1/2 log((1/2+eps)/(o+eps)); the mean over 4 entries halves a row.
    # Without eps: d = 2/3, o = 1/3, a row is 1/2 log(9/8), and the term 30000 x log(9/8) / 4 = 883.372.
    eps = 1e-7
    n = 1 / (1 + eps) ** 2
    diagonal, off = (n + 1) / 2 / ((n + 1) / 2 + 0.5), 0.5 / ((n + 1) / 2 + 0.5)
    row = 0.5 * math.log((0.5 + eps) / (diagonal + eps)) + 0.5 * math.log((0.5 + eps) / (off + eps))
    expected = 30000 * 2 * row / 4
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    teacher = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    method = method_class("pkt")(defaults("pkt"), context({"pool": (3,)}, {"pool": (2,)}))
    terms = method.loss(outputs({"pool": student}), outputs({"pool": teacher}), batch(2))
    assert set(terms) == {"ce", "pkt"}
    assert terms["pkt"].item() == pytest.approx(expected, rel=1e-9)
    assert terms["pkt"].item() == pytest.approx(883.37214, rel=1e-6)


def smooth_l1(difference: float) -> float:
    return 0.5 * difference**2 if abs(difference) < 1 else abs(difference) - 0.5


def loop_rkd(points: list[list[float]]) -> tuple[list[float], list[float]]:
    """Mean-normalised distances over all (i, j) and angle cosines over all (i, j, k), by explicit loops."""
    size = len(points)
    distances = [math.dist(points[i], points[j]) for i, j in itertools.product(range(size), repeat=2)]
    mean = sum(distances) / sum(1 for d in distances if d > 0)

    def unit(i: int, j: int) -> list[float]:
        vector = [b - a for a, b in zip(points[i], points[j])]
        length = math.hypot(*vector)
        return [v / length for v in vector] if length > 0 else [0.0] * len(vector)

    cosines = [sum(a * b for a, b in zip(unit(i, j), unit(i, k))) for i, j, k in itertools.product(range(size), repeat=3)]
    return [d / mean for d in distances], cosines


def test_rkd_logs_weighted_smooth_l1_distance_and_angle_terms() -> None:
    # Student: a right angle with legs 1, 1. Teacher: legs 3, 1 (and the teacher has a third dimension).
    # Distances / mean: student (1, 1, sqrt 2) / 1.13807, teacher (3, 1, sqrt 10) / 2.38743; smooth L1 of the
    # differences (-0.37791, 0.45982, -0.08191), each pair twice, over 9 entries, x 25 = 1.00265.
    # Angles: right-angle vertices 0 on both sides; vertex 1: cos 0.70711 vs 3/sqrt 10, vertex 2: 0.70711 vs
    # 1/sqrt 10; each twice (j, k swapped), other entries equal (1 or 0), over 27 entries, x 50 = 0.39101.
    student_points = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    teacher_points = [[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    (student_d, student_a), (teacher_d, teacher_a) = loop_rkd(student_points), loop_rkd(teacher_points)
    distance = sum(smooth_l1(s - t) for s, t in zip(student_d, teacher_d)) / 9
    angle = sum(smooth_l1(s - t) for s, t in zip(student_a, teacher_a)) / 27
    method = method_class("rkd")(defaults("rkd"), context({"pool": (3,)}, {"pool": (2,)}))
    terms = method.loss(outputs({"pool": torch.tensor(student_points, dtype=torch.float64)}),
                        outputs({"pool": torch.tensor(teacher_points, dtype=torch.float64)}), batch(3))
    assert set(terms) == {"ce", "rkd_distance", "rkd_angle"}
    assert terms["rkd_distance"].item() == pytest.approx(25 * distance, rel=1e-6)
    assert terms["rkd_angle"].item() == pytest.approx(50 * angle, rel=1e-6)
    assert terms["rkd_distance"].item() == pytest.approx(1.0026510, rel=1e-6)
    assert terms["rkd_angle"].item() == pytest.approx(0.3910104, rel=1e-6)


def test_cc_is_mean_correlation_of_consecutive_embedding_differences() -> None:
    # With identity embeddings: |s - t| rows [1, 2], [2, 0], [2, 1]; consecutive dot products 2 and 4,
    # mean 3, x 0.02 = 0.06.
    method = method_class("cc")(defaults("cc", embed_dim=2), context({"pool": (2,)}, {"pool": (2,)}))
    with torch.no_grad():
        for embed in (method.student_embed, method.teacher_embed):
            embed.weight.copy_(torch.eye(2))
            embed.bias.zero_()
    student = torch.tensor([[1.0, 2.0], [3.0, 1.0], [0.0, 0.0]])
    teacher = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, -1.0]])
    terms = method.loss(outputs({"pool": student}), outputs({"pool": teacher}), batch(3))
    assert set(terms) == {"ce", "cc"}
    assert terms["cc"].item() == pytest.approx(0.06, rel=1e-6)


def test_cc_trains_both_linear_embeddings_with_the_student() -> None:
    method = method_class("cc")(defaults("cc"), context({"pool": (64,)}, {"pool": (16,)}))
    shapes = {name: tuple(p.shape) for name, p in method.named_parameters()}
    assert shapes == {"student_embed.weight": (128, 16), "student_embed.bias": (128,),
                      "teacher_embed.weight": (128, 64), "teacher_embed.bias": (128,)}
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(4, 16, generator=generator, requires_grad=True)
    teacher = torch.randn(4, 64, generator=generator)
    method.loss(ModelOutput(torch.zeros(4, 3), {"pool": student}), ModelOutput(torch.zeros(4, 3), {"pool": teacher}),
                batch(4))["cc"].backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert method.teacher_embed.weight.grad.abs().sum() > 0


DIGITS_TEACHER = {"stem": (16, 8, 8), "layer1": (16, 8, 8), "layer2": (32, 4, 4), "layer3": (64, 2, 2), "pool": (64,)}
DIGITS_STUDENT = {"stem": (2, 8, 8), "layer1": (4, 8, 8), "layer2": (8, 4, 4), "layer3": (16, 2, 2), "pool": (16,)}


@pytest.mark.parametrize("name", sorted(METHOD_TERMS))
def test_every_method_trains_the_student_taps_it_reads(name: str) -> None:
    method = method_class(name)(defaults(name), context(DIGITS_TEACHER, DIGITS_STUDENT))
    generator = torch.Generator().manual_seed(1)
    student = {tap: torch.rand(4, *DIGITS_STUDENT[tap], generator=generator, requires_grad=True) for tap in method.student_taps}
    teacher = {tap: torch.rand(4, *DIGITS_TEACHER[tap], generator=generator) for tap in method.teacher_taps}
    terms = method.loss(ModelOutput(torch.zeros(4, 3), student), ModelOutput(torch.zeros(4, 3), teacher), batch(4))
    assert set(terms) == METHOD_TERMS[name]
    sum(term for key, term in terms.items() if key != "ce").backward()
    for tap, tensor in student.items():
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0, tap


# --- tap checks -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "overrides", "key"), [
    ("at", {"student_taps": ["layer1", "layer2"]}, "student_taps"),
    ("at", {"teacher_taps": []}, "teacher_taps"),
    ("at", {"teacher_taps": ["layer1", "layer2", "pool"]}, "teacher_taps"),
    ("at", {"student_taps": ["layer1", "layer2", "nope"]}, "student_taps"),
    ("sp", {"student_tap": "pool"}, "student_tap"),
    ("sp", {"teacher_tap": "pool"}, "teacher_tap"),
    ("pkt", {"teacher_tap": "layer3"}, "teacher_tap"),
    ("rkd", {"student_tap": "layer2"}, "student_tap"),
    ("cc", {"teacher_tap": "layer3"}, "teacher_tap"),
    ("cc", {"student_tap": "nope"}, "student_tap"),
])
def test_check_refuses_taps_that_do_not_fit_naming_the_key(name: str, overrides: dict[str, object], key: str) -> None:
    with pytest.raises(MethodConfigError) as error:
        method_class(name).check(defaults(name, **overrides), context(DIGITS_TEACHER, DIGITS_STUDENT))
    assert error.value.key == key


@pytest.mark.parametrize("name", sorted(METHOD_TERMS))
def test_defaults_fit_the_digits_pair(name: str) -> None:
    from models.registry import tap_shapes

    teacher, student = tap_shapes("resnet20", (1, 8, 8), 10), tap_shapes("resnet8x0.25", (1, 8, 8), 10)
    assert {name: teacher[name] for name in DIGITS_TEACHER} == DIGITS_TEACHER
    assert {name: student[name] for name in DIGITS_STUDENT} == DIGITS_STUDENT
    method_class(name).check(defaults(name), context(DIGITS_TEACHER, DIGITS_STUDENT))


# --- training ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(METHOD_TERMS))
def test_method_trains_on_digits_with_falling_loss_and_logs_its_terms(
    name: str, tiny_in_process, restore_torch_threads, tmp_path: Path
) -> None:
    log = train_student_on_digits(tiny_in_process, tmp_path, name, epochs=3)
    epochs = log["epochs"]
    assert len(epochs) == 3
    for entry in epochs:
        assert set(entry["terms"]) == METHOD_TERMS[name]
        assert all(math.isfinite(value) for value in entry["terms"].values())
        assert math.isfinite(entry["train_loss"])
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
