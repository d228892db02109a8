"""SupCon: the term against eq. 2 (L_out) written out with plain loops, the anchors without a
positive, the released head shapes, where gradients go, and a short training run on digits."""
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
from distill.supcon import supcon_term
from tests.conftest import train_student_on_digits


def defaults(**overrides: object) -> dict[str, object]:
    params = {key: spec["default"] for key, spec in method_class("supcon").METHOD["params"].items()}
    params.update(overrides)
    return params


def context(pool: int = 6) -> MethodContext:
    return MethodContext(num_classes=3, teacher_tap_shapes={}, student_tap_shapes={"pool": (pool,), "layer3": (pool, 2, 2)})


def unit_rows(rows: int, columns: int, seed: int) -> torch.Tensor:
    flat = torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return flat / flat.norm(dim=1, keepdim=True)


def supcon_by_loops(z: list[list[float]], labels: list[int], temperature: float, base_temperature: float) -> float:
    """Eq. 2 with one view per sample: for each anchor i with a positive, -1/|P(i)| sum_p log(
    exp(z_i.z_p/T) / sum_{a != i} exp(z_i.z_a/T)), times T / base_T, averaged over those anchors."""
    def dot(i: int, j: int) -> float:
        return sum(a * b for a, b in zip(z[i], z[j]))

    losses = []
    for i in range(len(z)):
        positives = [p for p in range(len(z)) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denominator = sum(math.exp(dot(i, a) / temperature) for a in range(len(z)) if a != i)
        total = sum(math.log(math.exp(dot(i, p) / temperature) / denominator) for p in positives)
        losses.append(-(temperature / base_temperature) * total / len(positives))
    return sum(losses) / len(losses)


def test_term_equals_eq_2_on_a_hand_sized_batch() -> None:
    # Three samples on the unit circle, labels [0, 0, 1], T = 1, base_T = 1. z0 . z1 = 0, z0 . z2 = 0.6,
    # z1 . z2 = 0.8. Anchor 0: -log(e^0 / (e^0 + e^0.6)) = log(1 + e^0.6) = 1.03748;
    # anchor 1: log(1 + e^0.8) = 1.17110; anchor 2 has no positive. Mean 1.10429.
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=torch.float64)
    value = supcon_term(z, torch.tensor([0, 0, 1]), temperature=1.0, base_temperature=1.0)
    assert value.item() == pytest.approx((math.log(1 + math.exp(0.6)) + math.log(1 + math.exp(0.8))) / 2, abs=1e-8)  # the released 1e-9 inside the log


@pytest.mark.parametrize(("temperature", "base_temperature"), [(0.07, 0.07), (0.1, 0.07), (0.5, 1.0)])
def test_term_equals_the_formula_written_as_loops_with_its_temperature_scaling(temperature: float, base_temperature: float) -> None:
    # Labels with 3, 2 and 1 members, so anchors have two, one and no positives.
    z = unit_rows(6, 4, seed=1)
    labels = [2, 0, 2, 1, 0, 2]
    expected = supcon_by_loops(z.tolist(), labels, temperature, base_temperature)
    value = supcon_term(z, torch.tensor(labels), temperature, base_temperature)
    # rel 1e-5: the released 1e-9 in the log weighs against the others' exp after the shift by the
    # row's maximum (the anchor's own 1 / T), which at T 0.07 can be ~1e-4 (tests/test_parity.py pins it)
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_anchors_without_a_positive_are_left_out_of_the_mean_not_counted_as_zero() -> None:
    # Adding a sample of a new label changes the others' denominators, so compare with the loops,
    # and check the value is not the guarded SupContrast mean (the lone anchor as 0, divided by 4).
    z = unit_rows(4, 3, seed=2)
    labels = [0, 0, 0, 1]
    value = supcon_term(z, torch.tensor(labels), 0.07, 0.07).item()
    expected = supcon_by_loops(z.tolist(), labels, 0.07, 0.07)
    assert math.isfinite(value)
    assert value == pytest.approx(expected, rel=1e-5)
    assert value != pytest.approx(expected * 3 / 4, rel=1e-3)


def test_all_distinct_labels_give_a_zero_term_with_finite_zero_gradients() -> None:
    z = unit_rows(4, 3, seed=3).requires_grad_()
    value = supcon_term(z, torch.tensor([0, 1, 2, 3]), 0.07, 0.07)
    assert value.item() == 0.0
    value.backward()
    assert z.grad is not None and torch.equal(z.grad, torch.zeros_like(z))


def test_a_lone_label_leaves_no_nan_in_the_gradient() -> None:
    # SupContrast's 2020 SupConLoss gives NaN here (0 / 0 for the lone anchor); this term must not.
    z = unit_rows(5, 3, seed=4).requires_grad_()
    supcon_term(z, torch.tensor([0, 1, 1, 2, 0]), 0.07, 0.07).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_method_weights_the_terms_and_normalises_the_head_output() -> None:
    method = method_class("supcon")(defaults(alpha=0.5, ce_weight=2.0), context())
    features = torch.randn(6, 6, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([0, 1, 0, 2, 1, 2])
    terms = method.loss(ModelOutput(torch.zeros(6, 3), {"pool": features}), None, Batch(torch.zeros(6), labels))
    assert set(terms) == {"ce", "supcon"}
    assert terms["ce"].item() == pytest.approx(2.0 * math.log(3.0), abs=1e-6)  # all-zero logits over 3 classes
    with torch.no_grad():
        projected = method.head(features)
        unit = projected / projected.norm(dim=1, keepdim=True)
    expected = supcon_by_loops(unit.double().tolist(), labels.tolist(), 0.07, 0.07)
    assert terms["supcon"].item() == pytest.approx(0.5 * expected, rel=1e-5)


def test_heads_are_supconresnets_mlp_and_linear() -> None:
    mlp = method_class("supcon")(defaults(), context(pool=6)).head
    layers = list(mlp)
    assert [type(layer) for layer in layers] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (layers[0].in_features, layers[0].out_features, layers[2].out_features) == (6, 6, 128)
    linear = method_class("supcon")(defaults(head="linear", feature_dim=16), context(pool=6)).head
    assert isinstance(linear, nn.Linear) and (linear.in_features, linear.out_features) == (6, 16)


def test_the_student_tap_must_be_an_embedding() -> None:
    with pytest.raises(MethodConfigError) as error:
        method_class("supcon")(defaults(student_tap="layer3"), context())
    assert error.value.key == "student_tap"


def test_reads_no_teacher_and_sends_gradients_to_the_student_tap_and_the_head() -> None:
    method = method_class("supcon")(defaults(), context())
    assert method.METHOD["uses_teacher"] is False
    assert method.teacher_taps == () and method.student_taps == ("pool",)
    features = torch.randn(8, 6, requires_grad=True)
    logits = torch.randn(8, 3, requires_grad=True)
    terms = method.loss(ModelOutput(logits, {"pool": features}), None, Batch(torch.zeros(8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])))
    terms["supcon"].backward()
    assert features.grad is not None and torch.isfinite(features.grad).all() and features.grad.abs().sum() > 0
    assert all(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in method.head.parameters())
    assert logits.grad is None  # the supcon term reads the embedding, not the logits


def test_supcon_trains_on_digits_with_falling_loss(tiny_in_process, restore_torch_threads, tmp_path: Path) -> None:
    log = train_student_on_digits(tiny_in_process, tmp_path, "supcon", {"alpha": 0.15}, epochs=3)
    epochs = log["epochs"]
    assert len(epochs) == 3
    for entry in epochs:
        assert set(entry["terms"]) == {"ce", "supcon"}
        assert all(math.isfinite(value) for value in entry["terms"].values())
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]


def test_the_released_epsilon_inside_the_log_is_kept_where_it_is_the_whole_value() -> None:
    # Two opposite embeddings of one label: after the shift by the row's maximum (the anchor's own
    # 1 / T), the only other score is exp(-2 / T) ~ 4e-13, so SupConLoss's log(... + 1e-9) decides it.
    z = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    shifted = -2.0 / 0.07
    expected = math.log(math.exp(shifted) + 1e-9) - shifted  # the same for both anchors
    assert supcon_term(z, torch.tensor([1, 1]), 0.07, 0.07).item() == pytest.approx(expected, rel=1e-9)
