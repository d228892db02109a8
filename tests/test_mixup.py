"""mixup and mixup3: the mixed images against the hand-made combination of their named partners, the
Dirichlet weights against their known moments, the same mix for the same generator seed (resume),
the loss against plain maths, the teacher seeing the student's mixed images, and a few epochs on
digits."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from distill.base import (
    Batch,
    MethodConfigError,
    MethodContext,
    ModelOutput,
    method_class,
)
from distill.composition import check_method
from distill.mixup import MixedBatch, mixing_weights
from stages.train_student import distillation_terms
from stages.training import step_generator
from tests.conftest import train_student_on_digits

SAMPLES = {"mixup": 2, "mixup3": 3}
CONTEXT = MethodContext(num_classes=3, teacher_tap_shapes={}, student_tap_shapes={})


def build(name: str, **overrides: float):
    params = {key: spec["default"] for key, spec in method_class(name).METHOD["params"].items()}
    params.update(overrides)
    return method_class(name)(params, CONTEXT)


def loader_batch(seed: int, size: int = 6) -> Batch:
    images = torch.arange(size * 2 * 2, dtype=torch.float64).reshape(size, 1, 2, 2) ** 1.5
    return Batch(images, torch.arange(size) % 3, 0, torch.arange(size), torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", SAMPLES)
def test_each_mixed_image_is_the_weighted_sum_of_itself_and_its_named_partners(name: str) -> None:
    batch = loader_batch(seed=3)
    mixed = build(name).prepare_batch(batch)
    assert isinstance(mixed, MixedBatch)
    count = SAMPLES[name]
    assert mixed.partners.shape == (count, 6) and len(mixed.weights) == count
    assert mixed.partners[0].tolist() == list(range(6))
    for row in mixed.partners[1:]:
        assert sorted(row.tolist()) == list(range(6))  # a permutation of the batch
    assert list(mixed.weights) == sorted(mixed.weights, reverse=True)
    assert 0.0 < mixed.weights[-1] and mixed.weights[0] < 1.0  # alpha 1: a real mix, not one image
    for i in range(6):
        expected = sum(mixed.weights[j] * batch.images[int(mixed.partners[j, i])] for j in range(count))
        assert torch.allclose(mixed.images[i], expected, rtol=0, atol=1e-12)
    assert torch.equal(mixed.labels, batch.labels) and torch.equal(mixed.indices, batch.indices)


@pytest.mark.parametrize(("count", "alpha"), [(2, 0.5), (2, 2.0), (3, 0.5), (3, 2.0)])
def test_weights_lie_on_the_simplex_with_the_dirichlet_moments(count: int, alpha: float) -> None:
    # Dirichlet(alpha x k): E[w_i] = alpha / (k alpha) = 1/k and E[w_i^2] = alpha (alpha + 1) / (k alpha (k alpha + 1)),
    # so E[sum_i w_i^2] = (alpha + 1) / (k alpha + 1); both survive sorting the weights.
    generator = torch.Generator().manual_seed(0)
    draws = torch.tensor([mixing_weights(alpha, count, generator) for _ in range(4000)], dtype=torch.float64)
    assert (draws >= 0).all() and torch.allclose(draws.sum(dim=1), torch.ones(4000, dtype=torch.float64))
    assert (draws[:, :-1] >= draws[:, 1:]).all()
    assert draws.mean().item() == pytest.approx(alpha / (count * alpha))
    assert (draws**2).sum(dim=1).mean().item() == pytest.approx((alpha + 1) / (count * alpha + 1), abs=0.02)


def test_sorted_uniform_weights_have_the_order_statistic_means_of_the_simplex() -> None:
    # alpha 1 is uniform on the simplex: E[max] of Beta(1, 1) is 3/4; for three weights the sorted
    # means are (1/3)(1 + 1/2 + 1/3), (1/3)(1/2 + 1/3), (1/3)(1/3) = 11/18, 5/18, 2/18.
    generator = torch.Generator().manual_seed(1)
    two = torch.tensor([mixing_weights(1.0, 2, generator) for _ in range(4000)])
    three = torch.tensor([mixing_weights(1.0, 3, generator) for _ in range(4000)])
    assert two[:, 0].mean().item() == pytest.approx(0.75, abs=0.01)
    assert three.mean(dim=0).tolist() == pytest.approx([11 / 18, 5 / 18, 2 / 18], abs=0.01)


@pytest.mark.parametrize("name", SAMPLES)
def test_the_same_generator_seed_gives_the_same_mix_and_another_seed_another(name: str) -> None:
    method = build(name)
    first, again, other = (method.prepare_batch(loader_batch(seed)) for seed in (7, 7, 8))
    assert torch.equal(first.images, again.images) and torch.equal(first.partners, again.partners)
    assert first.weights == again.weights
    assert first.weights != other.weights and not torch.equal(first.images, other.images)


@pytest.mark.parametrize("name", SAMPLES)
def test_a_tiny_alpha_leaves_the_images_nearly_unmixed(name: str) -> None:
    method = build(name, alpha=0.0001)
    for seed in range(20):
        batch = loader_batch(seed)
        mixed = method.prepare_batch(batch)
        assert mixed.weights[0] > 0.999
        assert (mixed.images - batch.images).abs().max() <= 1e-3 * batch.images.abs().max()


def test_mixup_refuses_a_batch_without_the_loops_generator() -> None:
    with pytest.raises(ValueError, match="generator"):
        build("mixup").prepare_batch(Batch(torch.zeros(2, 1, 2, 2), torch.tensor([0, 1])))


STUDENT = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [2.0, -1.0, 0.5]]
TEACHER = [[3.0, 2.0, 1.0], [1.0, 0.0, -1.0], [0.0, 0.0, 2.0]]
LABELS = [2, 1, 0]


def log_softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    scaled = [value / temperature for value in row]
    normaliser = math.log(sum(math.exp(value) for value in scaled))
    return [value - normaliser for value in scaled]


@pytest.mark.parametrize(("name", "partners", "weights"), [
    ("mixup", [[0, 1, 2], [2, 0, 1]], (0.7, 0.3)),
    ("mixup3", [[0, 1, 2], [2, 0, 1], [1, 1, 0]], (0.5, 0.3, 0.2)),
])
def test_loss_is_weighted_cross_entropy_per_partner_plus_t_squared_batchmean_kl(
        name: str, partners: list[list[int]], weights: tuple[float, ...]) -> None:
    temperature, kd_weight, ce_weight = 2.0, 0.9, 0.1
    method = build(name, temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight)
    batch = MixedBatch(images=torch.zeros(3, 1, 1, 1), labels=torch.tensor(LABELS),
                       partners=torch.tensor(partners), weights=weights)
    terms = method.loss(ModelOutput(torch.tensor(STUDENT, dtype=torch.float64)),
                        ModelOutput(torch.tensor(TEACHER, dtype=torch.float64)), batch)
    assert list(terms) == ["ce", "kd"]

    ce = sum(weight * sum(-log_softmax(STUDENT[i])[LABELS[partner[i]]] for i in range(3)) / 3
             for weight, partner in zip(weights, partners))
    kl = 0.0
    for student, teacher in zip(STUDENT, TEACHER):
        log_s, log_t = log_softmax(student, temperature), log_softmax(teacher, temperature)
        kl += sum(math.exp(t) * (t - s) for s, t in zip(log_s, log_t))
    assert terms["ce"].item() == pytest.approx(ce_weight * ce, abs=1e-12)
    assert terms["kd"].item() == pytest.approx(kd_weight * temperature**2 * kl / 3, abs=1e-12)


@pytest.mark.parametrize("name", SAMPLES)
def test_the_teacher_sees_the_students_mixed_images_and_a_resumed_step_mixes_the_same(name: str) -> None:
    # A teacher that is a copy of the student scores KD exactly 0 only if both saw the same images.
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
    teacher.load_state_dict(student.state_dict())
    batch = loader_batch(seed=0)
    compute = distillation_terms(student, teacher, build(name))
    terms, logits = compute(batch.images, batch.labels, 2, batch.indices, step_generator(5, 2, 0))
    assert terms["kd"].item() == 0.0
    assert not torch.allclose(logits, student(batch.images))  # the student predicted on mixed images
    _, next_step = compute(batch.images, batch.labels, 2, batch.indices, step_generator(5, 2, 1))
    assert not torch.allclose(next_step, logits)
    _, resumed = distillation_terms(student, teacher, build(name))(batch.images, batch.labels, 2, batch.indices, step_generator(5, 2, 0))
    assert torch.equal(resumed, logits)


def test_mixup_and_mixup3_cannot_be_combined() -> None:
    settings = {"name": "mixup+mixup3", "parts": [{"name": "mixup", "params": build("mixup").params},
                                                 {"name": "mixup3", "params": build("mixup3").params}]}
    with pytest.raises(MethodConfigError, match="prepare_batch"):
        check_method(settings, CONTEXT)


@pytest.mark.parametrize("method", SAMPLES)
def test_method_trains_on_digits_with_a_falling_loss(tiny_in_process, restore_torch_threads, tmp_path: Path, method: str) -> None:
    log = train_student_on_digits(tiny_in_process, tmp_path, method, None, epochs=3)
    epochs = log["epochs"]
    assert len(epochs) == 3
    for entry in epochs:
        assert list(entry["terms"]) == ["ce", "kd"]
        assert all(math.isfinite(value) for value in entry["terms"].values())
        assert entry["train_loss"] == pytest.approx(sum(entry["terms"].values()))
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
