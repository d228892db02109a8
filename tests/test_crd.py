"""CRD (issue 7): the contrast loss and Z against plain arithmetic, the memory-bank update, the
indices that carry each sample's place in the training set, training on digits, and the refusal
of an ``nce_k`` the training set cannot supply.

Expected values are worked out here with ``math`` on lists, not with distill/crd.py's helpers.
"""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

import distill.crd
from data.registry import DatasetSplits
from distill.base import Batch, Method, MethodConfigError, MethodContext, ModelOutput, method_class
from stages.train_student import distillation_terms
from stages.training import training_batches
from tests.conftest import train_student_on_digits

EPS = 1e-7


def params(**overrides: Any) -> dict[str, Any]:
    declared = method_class("crd").METHOD["params"]
    return {key: spec["default"] for key, spec in declared.items()} | overrides


def context(train_size: int, dim: int = 2, labels: list[int] | None = None) -> MethodContext:
    """Tap shapes for CRD; the training labels cycle through the 3 classes unless given."""
    train_labels = torch.tensor(labels if labels is not None else [index % 3 for index in range(train_size)])
    return MethodContext(num_classes=3, teacher_tap_shapes={"pool": (dim,)}, student_tap_shapes={"pool": (dim,)},
                         train_size=train_size, train_labels=train_labels if train_size else None)


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def nce(scores: list[list[float]], train_size: int) -> float:
    """ContrastLoss by hand: rows of normalised scores, the positive first."""
    total = 0.0
    for row in scores:
        noise = (len(row) - 1) / train_size
        total += math.log(row[0] / (row[0] + noise + EPS))
        total += sum(math.log(noise / (x + noise + EPS)) for x in row[1:])
    return -total / len(scores)


# Four training samples, feat_dim 2, two negatives each, temperature 0.5.
STUDENT_BANK = [[1.0, 0.0], [0.0, 1.0], [-0.6, 0.8], [0.8, -0.6]]
TEACHER_BANK = [[0.6, 0.8], [-1.0, 0.0], [0.0, -1.0], [0.8, 0.6]]
STUDENT_FEATURES = [[3.0, 4.0], [1.0, 0.0]]
TEACHER_FEATURES = [[1.0, 2.0], [-1.0, 1.0]]
INDICES = [2, 0]
ROWS = [[2, 1, 3], [0, 3, 1]]


def hand_built_crd(monkeypatch: pytest.MonkeyPatch, **overrides: Any) -> distill.crd.CRD:
    """CRD with identity embeddings (so an embedding is its feature vector, normalised), the banks
    above, and the contrast rows above instead of random ones."""
    method = method_class("crd")(params(feat_dim=2, nce_k=2, nce_t=0.5, **overrides), context(train_size=4))
    for linear in (method.student_embed, method.teacher_embed):
        nn.init.eye_(linear.weight)
        nn.init.zeros_(linear.bias)
    method.student_bank.copy_(torch.tensor(STUDENT_BANK))
    method.teacher_bank.copy_(torch.tensor(TEACHER_BANK))
    monkeypatch.setattr(distill.crd, "draw_contrast_indices", lambda indices, candidates, nce_k, generator: torch.tensor(ROWS))
    return method


def crd_loss(method: distill.crd.CRD) -> dict[str, torch.Tensor]:
    student = ModelOutput(torch.zeros(2, 3), {"pool": torch.tensor(STUDENT_FEATURES)})
    teacher = ModelOutput(torch.zeros(2, 3), {"pool": torch.tensor(TEACHER_FEATURES)})
    return method.loss(student, teacher, Batch(torch.zeros(2, 1, 1, 1), torch.tensor([0, 1]), 0, torch.tensor(INDICES)))


# --- (a) the contrast loss and Z ----------------------------------------------------------------------

def test_contrast_loss_is_repdistillers_formula_on_fixed_scores() -> None:
    scores = [[0.5, 0.1, 2.0], [0.05, 0.3, 0.3]]
    loss = distill.crd.contrast_loss(torch.tensor(scores, dtype=torch.float64), train_size=4)
    assert loss.item() == pytest.approx(nce(scores, 4), rel=1e-9)


def test_crd_term_contrasts_each_side_with_the_other_sides_bank_normalised_by_first_batch_z(monkeypatch) -> None:
    method = hand_built_crd(monkeypatch)
    terms = crd_loss(method)
    student = [unit(v) for v in STUDENT_FEATURES]
    teacher = [unit(v) for v in TEACHER_FEATURES]
    # the student's embedding meets the teacher bank, the teacher's the student bank; exp(dot / T)
    raw_s = [[math.exp(dot(TEACHER_BANK[r], student[i]) / 0.5) for r in ROWS[i]] for i in range(2)]
    raw_t = [[math.exp(dot(STUDENT_BANK[r], teacher[i]) / 0.5) for r in ROWS[i]] for i in range(2)]
    z_s = sum(map(sum, raw_s)) / 6 * 4  # mean over the 2 x 3 scores, times the 4 training samples
    z_t = sum(map(sum, raw_t)) / 6 * 4
    assert method.normalizers.tolist() == pytest.approx([z_s, z_t], rel=1e-5)
    expected = nce([[x / z_s for x in row] for row in raw_s], 4) + nce([[x / z_t for x in row] for row in raw_t], 4)
    assert terms["crd"].item() == pytest.approx(0.8 * expected, rel=1e-5)
    assert set(terms) == {"ce", "crd"}
    assert terms["ce"].item() == pytest.approx(math.log(3), rel=1e-6)

    crd_loss(method)  # Z is set once: a second batch keeps it
    assert method.normalizers.tolist() == pytest.approx([z_s, z_t], rel=1e-5)


# --- (b) the memory update ----------------------------------------------------------------------------

def test_positive_rows_become_the_renormalised_momentum_average_and_the_rest_stay(monkeypatch) -> None:
    method = hand_built_crd(monkeypatch, nce_m=0.3)
    crd_loss(method)
    student = [unit(v) for v in STUDENT_FEATURES]
    teacher = [unit(v) for v in TEACHER_FEATURES]
    expected_student_bank = [row[:] for row in STUDENT_BANK]
    expected_teacher_bank = [row[:] for row in TEACHER_BANK]
    for i, index in enumerate(INDICES):
        expected_student_bank[index] = unit([0.3 * a + 0.7 * b for a, b in zip(STUDENT_BANK[index], student[i])])
        expected_teacher_bank[index] = unit([0.3 * a + 0.7 * b for a, b in zip(TEACHER_BANK[index], teacher[i])])
    for got, want in zip(method.student_bank.tolist(), expected_student_bank):
        assert got == pytest.approx(want, abs=1e-6)
    for got, want in zip(method.teacher_bank.tolist(), expected_teacher_bank):
        assert got == pytest.approx(want, abs=1e-6)


def test_banks_start_uniform_within_one_over_sqrt_feat_dim_over_3_and_are_saved_with_the_method() -> None:
    method = method_class("crd")(params(nce_k=10), context(train_size=500, dim=8))
    bound = 1 / math.sqrt(128 / 3)
    for bank in (method.student_bank, method.teacher_bank):
        assert bank.shape == (500, 128)
        assert bank.abs().max().item() <= bound and bank.abs().max().item() > 0.9 * bound
    saved = nn.ModuleDict({"model": nn.Linear(1, 1), "method": method}).state_dict()  # what EpochLoop checkpoints
    assert {"method.student_bank", "method.teacher_bank", "method.normalizers"} <= set(saved)


def test_any_other_sample_negatives_are_distinct_and_never_the_positive_itself() -> None:
    indices = torch.tensor([0, 5, 9])
    candidates = distill.crd.negative_candidates(indices, None, train_size=10)
    rows = distill.crd.draw_contrast_indices(indices, candidates, 9, torch.Generator().manual_seed(0))
    assert rows[:, 0].tolist() == indices.tolist()
    for index, row in zip(indices.tolist(), rows[:, 1:].tolist()):
        assert sorted(row) == [other for other in range(10) if other != index]


def test_other_class_negatives_are_every_sample_of_the_other_classes_as_repdistillers_exact_mode() -> None:
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 1])
    indices = torch.tensor([0, 4, 8])
    candidates = distill.crd.negative_candidates(indices, labels, train_size=10)
    by_hand = {0: [1, 2, 4, 5, 7, 8, 9], 4: [0, 2, 3, 5, 6, 8], 8: [0, 1, 3, 4, 6, 7, 9]}
    for index, nce_k in ((0, 7), (4, 6), (8, 7)):
        row = candidates[indices.tolist().index(index)]
        assert torch.nonzero(row).flatten().tolist() == by_hand[index]
    rows = distill.crd.draw_contrast_indices(indices, candidates, 6, torch.Generator().manual_seed(1))
    for index, row in zip(indices.tolist(), rows[:, 1:].tolist()):
        assert len(set(row)) == 6 and set(row) <= set(by_hand[index])


def test_the_same_step_generator_draws_the_same_negatives_so_a_resumed_epoch_repeats_them() -> None:
    indices, candidates = torch.tensor([1, 2]), torch.ones(2, 50)
    first, again, other = (
        distill.crd.draw_contrast_indices(indices, candidates, 10, torch.Generator().manual_seed(seed)) for seed in (5, 5, 6)
    )
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_other_class_negatives_need_the_labels_and_enough_samples_outside_the_largest_class() -> None:
    crd = method_class("crd")
    unlabelled = MethodContext(num_classes=3, teacher_tap_shapes={"pool": (2,)}, student_tap_shapes={"pool": (2,)}, train_size=10)
    crd.check(params(nce_k=4), unlabelled)  # the preflight: the size is known, the labels are not
    with pytest.raises(MethodConfigError, match="training labels are not known"):
        crd(params(nce_k=4), unlabelled)
    crd(params(nce_k=4, negatives="any_other_sample"), unlabelled)
    skewed = context(train_size=10, labels=[0] * 6 + [1, 1, 2, 2])
    with pytest.raises(MethodConfigError, match="leaves only 4 training samples of other classes"):
        crd.check(params(nce_k=5), skewed)
    crd.check(params(nce_k=4), skewed)


# --- (c) indices reach the Batch and match their samples -----------------------------------------------

class RecordingMethod(Method):
    METHOD = {"name": "recording", "uses_teacher": False, "params": {}, "pre_stage": None}

    def __init__(self) -> None:
        super().__init__({}, context(train_size=0))
        self.batches: list[Batch] = []

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        self.batches.append(batch)
        return {"ce": student.logits.sum() * 0}


def test_training_batches_carry_each_samples_index_into_the_batch() -> None:
    size = 11
    empty = torch.empty(0, 1, 2, 2, dtype=torch.uint8)
    data = DatasetSplits(  # image i is filled with i, its label is i mod 3
        train_images=torch.arange(size, dtype=torch.uint8).view(size, 1, 1, 1).expand(size, 1, 2, 2).clone(),
        train_labels=torch.arange(size) % 3, val_images=empty, val_labels=torch.empty(0, dtype=torch.int64),
        test_images=empty, test_labels=torch.empty(0, dtype=torch.int64), num_classes=3, image_shape=(1, 2, 2),
        channel_mean=(0.0,), channel_std=(1.0,), augment=None,
    )
    settings = SimpleNamespace(batch_size=4, augment=False, seed=3)  # what training_batches reads of TrainingSettings
    method, student = RecordingMethod(), nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    compute_terms = distillation_terms(student, None, method)
    seen = []
    for images, labels, indices in training_batches(data, settings, epoch=0):
        assert images[:, 0, 0, 0].long().tolist() == indices.tolist()
        assert labels.tolist() == (indices % 3).tolist()
        compute_terms(images, labels, 0, indices, torch.Generator())
        assert method.batches[-1].indices is indices
        seen += indices.tolist()
    assert sorted(seen) == list(range(size))
    again = [index for _, _, indices in training_batches(data, settings, epoch=0) for index in indices.tolist()]
    assert again == seen  # the order is a function of (seed, epoch), as resume needs


# --- (d) training on digits ---------------------------------------------------------------------------

def test_crd_trains_on_digits_with_indices_of_the_whole_training_set(
    tiny_in_process, restore_torch_threads, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[list[int], list[int]]] = []
    loss = distill.crd.CRD.loss

    def recording_loss(self, student, teacher, batch):
        seen.append((batch.indices.tolist(), batch.labels.tolist()))
        return loss(self, student, teacher, batch)

    monkeypatch.setattr(distill.crd.CRD, "loss", recording_loss)
    log = train_student_on_digits(tiny_in_process, tmp_path, "crd", {"nce_k": 256}, epochs=3)
    epochs = log["epochs"]
    assert len(epochs) == 3
    for entry in epochs:
        assert list(entry["terms"]) == ["ce", "crd"]
        assert all(math.isfinite(value) for value in entry["terms"].values())
        assert entry["train_loss"] == pytest.approx(sum(entry["terms"].values()))
    ce = [entry["terms"]["ce"] for entry in epochs]
    assert ce[0] > ce[1] > ce[2]
    # In the first epoch the banks still hold their random rows, against which the contrast is easier
    # (digits: crd about 11.0, then 14.2 once every row holds a real embedding, then 11.9); from the
    # second epoch on, the contrast and the total loss fall.
    assert epochs[2]["terms"]["crd"] < epochs[1]["terms"]["crd"]
    assert epochs[2]["train_loss"] < epochs[1]["train_loss"]

    label_of: dict[int, int] = {}
    for indices, labels in seen:
        for index, label in zip(indices, labels):
            assert label_of.setdefault(index, label) == label  # the same index always brings the same sample
    train_size = len(label_of)
    assert sorted(label_of) == list(range(train_size)) and train_size > 1000
    assert sum(len(indices) for indices, _ in seen) == 3 * train_size  # each epoch visits every sample once


# --- (e) refusing an nce_k the training set cannot supply ---------------------------------------------

def test_check_refuses_nce_k_without_enough_training_samples_and_skips_an_unknown_size() -> None:
    crd = method_class("crd")
    with pytest.raises(MethodConfigError) as refused:
        crd.check(params(nce_k=16384), context(train_size=1300))
    assert refused.value.key == "nce_k"
    assert "16384" in str(refused.value) and "16385" in str(refused.value) and "1300" in str(refused.value)
    crd.check(params(nce_k=1299, negatives="any_other_sample"), context(train_size=1300))
    crd.check(params(nce_k=16384), context(train_size=0))  # preflight: no data loaded, nothing to compare
    with pytest.raises(MethodConfigError):
        crd(params(nce_k=4), context(train_size=4))


def test_the_stage_refuses_nce_k_beyond_the_digits_training_set(tiny_in_process, restore_torch_threads, tmp_path: Path) -> None:
    with pytest.raises(Exception) as refused:
        train_student_on_digits(tiny_in_process, tmp_path, "crd", {"nce_k": 16384}, epochs=1)
    message = str(refused.value)
    assert "methods.crd.nce_k" in message and "16385" in message


def test_the_preflight_refuses_nce_k_beyond_the_digits_training_split_before_anything_trains(tmp_path: Path) -> None:
    from pipeline.catalogue import load_catalogue
    from pipeline.plan import build_plan
    from pipeline.sweep import SweepError
    from stages.preflight import check_plan
    from tests.conftest import write_sweep

    plan = build_plan(write_sweep(tmp_path / "crd.yaml", {"axes.method": ["crd"]}))
    with pytest.raises(SweepError, match=r"methods\.crd\.nce_k: nce_k 16384 needs at least 16385 training samples.*has 1294"):
        check_plan(plan, load_catalogue())
    few = build_plan(write_sweep(tmp_path / "few.yaml", {"axes.method": ["crd"], "defaults.methods.crd": {"nce_k": 256},
                                                         "defaults.data.subset_size": 200}))
    with pytest.raises(SweepError, match="has 200"):
        check_plan(few, load_catalogue())
