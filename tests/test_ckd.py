"""Comparative KD: the loss against plain-Python loops over the comparisons, the fixed within-batch
grouping, the invariances the difference gives (identical and shifted students score zero), that
only the student gets gradients, and a short training run on digits."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from distill.base import Batch, MethodContext, ModelOutput, method_class
from distill.ckd import comparison_groups
from tests.conftest import train_student_on_digits

STUDENT = [[1.0, 2.0, 3.0], [0.0, 0.5, -1.0], [2.0, -1.0, 0.0], [0.25, 0.0, 1.5]]
TEACHER = [[2.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 3.0, 1.0], [-1.0, 0.5, 2.0]]
LABELS = [2, 0, 1, 2]


def build(**overrides: Any):
    params = {key: spec["default"] for key, spec in method_class("ckd").METHOD["params"].items()}
    params.update(overrides)
    return method_class("ckd")(params, MethodContext(num_classes=3, teacher_tap_shapes={}, student_tap_shapes={}))


def run_loss(method, student=STUDENT, teacher=TEACHER, labels=LABELS) -> dict[str, torch.Tensor]:
    return method.loss(ModelOutput(torch.tensor(student, dtype=torch.float64)),
                       ModelOutput(torch.tensor(teacher, dtype=torch.float64)),
                       Batch(torch.zeros(len(labels)), torch.tensor(labels)))


# --- plain-Python references ------------------------------------------------------------------------

def softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def group_difference(rows: list[list[float]], positives: list[int], negatives: list[int]) -> list[float]:
    classes = range(len(rows[0]))
    return [sum(rows[m][c] for m in positives) / len(positives) - sum(rows[m][c] for m in negatives) / len(negatives)
            for c in classes]


def t2_kl(student_row: list[float], target_row: list[float], temperature: float) -> float:
    p_target = softmax([v / temperature for v in target_row])
    p_student = softmax([v / temperature for v in student_row])
    return temperature**2 * sum(t * math.log(t / s) for t, s in zip(p_target, p_student))


def reference(student, teacher, labels, group_size: int, temperature: float) -> tuple[float, float]:
    """(ckd, label) unweighted: comparison i of samples i..i+k-1 (mod N), the first k - k//2 positive."""
    n, classes = len(student), len(student[0])
    one_hot = [[1.0 if c == label else 0.0 for c in range(classes)] for label in labels]
    ckd, label = 0.0, 0.0
    for i in range(n):
        members = [(i + j) % n for j in range(group_size)]
        split = group_size - group_size // 2
        positives, negatives = members[:split], members[split:]
        student_difference = group_difference(student, positives, negatives)
        ckd += t2_kl(student_difference, group_difference(teacher, positives, negatives), temperature)
        label += t2_kl(student_difference, group_difference(one_hot, positives, negatives), temperature)
    return ckd / n, label / n


def cross_entropy(student, labels) -> float:
    return sum(-math.log(softmax(row)[label]) for row, label in zip(student, labels)) / len(labels)


# --- the loss -----------------------------------------------------------------------------------------

def test_defaults_are_the_released_codes_triples_at_t4_with_unit_weights_and_no_cross_entropy() -> None:
    # alextxu/ckd train_student.py: --pos_and_neg 3, kd_T 4, w_rel 1, w_cls 1, and no per-sample CE.
    params = {key: spec["default"] for key, spec in method_class("ckd").METHOD["params"].items()}
    assert params == {"group_size": 3, "temperature": 4.0, "weight": 1.0, "label_weight": 1.0, "ce_weight": 0.0}
    terms = run_loss(build())
    ckd, label = reference(STUDENT, TEACHER, LABELS, 3, 4.0)
    assert list(terms) == ["ce", "ckd", "label"]
    assert terms["ckd"].item() == pytest.approx(ckd, rel=1e-12)
    assert terms["label"].item() == pytest.approx(label, rel=1e-12)
    assert terms["ce"].item() == 0.0


@pytest.mark.parametrize(("group_size", "temperature"), [(2, 4.0), (3, 2.0), (4, 1.0), (5, 3.0)])
def test_terms_equal_the_loops_over_comparisons_times_their_weights(group_size: int, temperature: float) -> None:
    method = build(group_size=group_size, temperature=temperature, weight=0.7, label_weight=0.3, ce_weight=0.2)
    terms = run_loss(method)
    ckd, label = reference(STUDENT, TEACHER, LABELS, group_size, temperature)
    assert ckd > 0.01 and label > 0.01
    assert terms["ckd"].item() == pytest.approx(0.7 * ckd, rel=1e-12)
    assert terms["label"].item() == pytest.approx(0.3 * label, rel=1e-12)
    assert terms["ce"].item() == pytest.approx(0.2 * cross_entropy(STUDENT, LABELS), rel=1e-12)


def test_a_batch_smaller_than_the_group_wraps_onto_itself() -> None:
    # Two samples, triples: comparison 0 is (0, 1) - (0), comparison 1 is (1, 0) - (1).
    student, teacher, labels = STUDENT[:2], TEACHER[:2], LABELS[:2]
    terms = run_loss(build(group_size=3), student, teacher, labels)
    ckd, label = reference(student, teacher, labels, 3, 4.0)
    assert terms["ckd"].item() == pytest.approx(ckd, rel=1e-12)
    assert terms["label"].item() == pytest.approx(label, rel=1e-12)
    single = run_loss(build(group_size=2), STUDENT[:1], TEACHER[:1], LABELS[:1])
    assert single["ckd"].item() == 0.0 and single["label"].item() == 0.0  # a sample against itself


def test_comparisons_are_each_sample_with_the_next_ones_in_batch_order() -> None:
    positives, negatives = comparison_groups(4, 3)
    assert positives.tolist() == [[0, 1], [1, 2], [2, 3], [3, 0]]
    assert negatives.tolist() == [[2], [3], [0], [1]]
    positives, negatives = comparison_groups(3, 2)
    assert positives.tolist() == [[0], [1], [2]] and negatives.tolist() == [[1], [2], [0]]


# --- invariances --------------------------------------------------------------------------------------

def test_a_student_equal_to_its_teacher_scores_exactly_zero() -> None:
    assert run_loss(build(), STUDENT, STUDENT)["ckd"].item() == 0.0


def test_a_shift_shared_by_every_sample_cancels_in_the_differences() -> None:
    # Student = teacher + c for one vector c: every group mean moves by c, so the differences are equal.
    # The values are dyadic, so the float64 differences agree bit for bit.
    shift = [0.5, -2.0, 3.25]
    shifted = [[t + c for t, c in zip(row, shift)] for row in TEACHER]
    for group_size in (2, 3, 4):
        assert run_loss(build(group_size=group_size), shifted, TEACHER)["ckd"].item() == 0.0
    # A different constant per sample on all its classes: softmax ignores it, so the term is ~0 too.
    per_sample = [[t + offset for t in row] for row, offset in zip(TEACHER, [1.0, -3.0, 0.5, 7.0])]
    assert run_loss(build(), per_sample, TEACHER)["ckd"].item() == pytest.approx(0.0, abs=1e-12)
    # While a shift of one sample's single class does change the differences.
    moved = [row[:] for row in TEACHER]
    moved[1][0] += 1.0
    assert run_loss(build(), moved, TEACHER)["ckd"].item() > 1e-3


def test_gradients_reach_the_student_only() -> None:
    student = torch.tensor(STUDENT, dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor(TEACHER, dtype=torch.float64, requires_grad=True)
    terms = build(ce_weight=1.0).loss(ModelOutput(student), ModelOutput(teacher),
                                      Batch(torch.zeros(4), torch.tensor(LABELS)))
    sum(terms.values()).backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert (student.grad.abs().sum(dim=1) > 0).all()


# --- training -----------------------------------------------------------------------------------------

def test_ckd_trains_on_digits_and_logs_its_terms(tiny_in_process, restore_torch_threads, tmp_path: Path) -> None:
    log = train_student_on_digits(tiny_in_process, tmp_path, "ckd", {"group_size": 2}, epochs=3)
    epochs = log["epochs"]
    assert len(epochs) == 3
    for entry in epochs:
        assert list(entry["terms"]) == ["ce", "ckd", "label"]
        assert all(math.isfinite(value) for value in entry["terms"].values())
        assert entry["train_loss"] == pytest.approx(sum(entry["terms"].values()))
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
