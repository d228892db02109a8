"""FitNet and VID, the methods with a learned regressor from student to teacher maps: each loss against
numbers worked out by hand with the regressor's weights set, the regressor's shape rules and
refusals, and its training with the student (tests/test_distill.py checks every METHOD literal)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from distill.base import Batch, MethodConfigError, MethodContext, ModelOutput, method_class
from models.registry import tap_shapes
from tests.conftest import train_student_on_digits
from tests.test_feature_methods import context, defaults

METHOD_NAMES = ("fitnet", "vid")
TEACHER_SHAPES = tap_shapes("resnet20", (1, 8, 8), 10)
STUDENT_SHAPES = tap_shapes("resnet8x0.25", (1, 8, 8), 10)




def pair_context() -> MethodContext:
    return MethodContext(num_classes=10, teacher_tap_shapes=TEACHER_SHAPES, student_tap_shapes=STUDENT_SHAPES)


def softplus_inverse(value: float) -> float:
    return math.log(math.expm1(value))


# --- the pair and its taps ----------------------------------------------------------------------

def test_the_pair_s_taps_are_the_shapes_these_tests_assume() -> None:
    assert TEACHER_SHAPES["layer1"] == (16, 8, 8) and STUDENT_SHAPES["layer1"] == (4, 8, 8)
    assert TEACHER_SHAPES["layer2"] == (32, 4, 4) and STUDENT_SHAPES["layer2"] == (8, 4, 4)
    assert TEACHER_SHAPES["layer3"] == (64, 2, 2) and STUDENT_SHAPES["layer3"] == (16, 2, 2)


# --- FitNet ---------------------------------------------------------------------------------------------

def test_fitnet_is_weighted_mse_of_conv_bn_relu_regression_plus_weighted_cross_entropy() -> None:
    # Student map (1 channel, 2x2) x = [1, 3, 5, -1]; 1x1 conv to 2 channels, weights [1, -1], bias
    # [0, 0.5]; batch norm (eval, eps 0) with running mean [1, 0] and variance [4, 1]:
    # channel 0 = relu((x - 1) / 2) = [0, 1, 2, 0], channel 1 = relu(0.5 - x) = [0, 0, 0, 1.5].
    # Teacher map: channel 0 all 1, channel 1 all 0. Squared errors: [1, 0, 1, 1] and [0, 0, 0, 2.25],
    # sum 5.25 over 8 entries = 0.65625, x weight 100 = 65.625.
    # CE of logits [0, 0, 0] on label 0 = log 3 = 1.0986123, x ce_weight 0.5 = 0.5493061.
    method = method_class("fitnet")(defaults("fitnet", ce_weight=0.5),
                                    context({"layer2": (2, 2, 2)}, {"layer2": (1, 2, 2)}))
    regressor = method.regressor
    with torch.no_grad():
        regressor.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        regressor.conv.bias.copy_(torch.tensor([0.0, 0.5]))
        regressor.bn.running_mean.copy_(torch.tensor([1.0, 0.0]))
        regressor.bn.running_var.copy_(torch.tensor([4.0, 1.0]))
    regressor.bn.eps = 0.0
    method.eval()
    student = torch.tensor([1.0, 3.0, 5.0, -1.0]).view(1, 1, 2, 2)
    teacher = torch.stack([torch.ones(2, 2), torch.zeros(2, 2)]).unsqueeze(0)
    terms = method.loss(ModelOutput(torch.zeros(1, 3), {"layer2": student}),
                        ModelOutput(torch.zeros(1, 3), {"layer2": teacher}), Batch(torch.zeros(1), torch.tensor([0])))
    assert list(terms) == ["ce", "fitnet"]
    assert terms["fitnet"].item() == pytest.approx(65.625, abs=1e-4)
    assert terms["ce"].item() == pytest.approx(0.5493061, abs=1e-6)


@pytest.mark.parametrize(("student", "teacher", "conv_type", "kernel", "stride"), [
    ((4, 8, 8), (8, 4, 4), nn.Conv2d, (3, 3), (2, 2)),           # twice the teacher's size: strided 3x3
    ((4, 2, 2), (8, 4, 4), nn.ConvTranspose2d, (4, 4), (2, 2)),  # half of it: transposed 4x4
    ((4, 5, 5), (8, 3, 3), nn.Conv2d, (3, 3), (1, 1)),           # larger: (1 + 5 - 3) square kernel
    ((4, 4, 4), (8, 4, 4), nn.Conv2d, (1, 1), (1, 1)),           # the same size: 1x1
])
def test_fitnet_regressor_follows_convreg_and_lands_on_the_teacher_shape(student, teacher, conv_type, kernel, stride) -> None:
    method = method_class("fitnet")(defaults("fitnet"), context({"layer2": teacher}, {"layer2": student}))
    assert type(method.regressor.conv) is conv_type
    assert method.regressor.conv.kernel_size == kernel and method.regressor.conv.stride == stride
    assert method.regressor(torch.randn(2, *student)).shape == (2, *teacher)


def test_fitnet_refuses_taps_it_cannot_regress() -> None:
    fitnet = method_class("fitnet")
    with pytest.raises(MethodConfigError) as error:
        fitnet.check(defaults("fitnet"), context({"layer2": (8, 4, 4)}, {"layer2": (4, 3, 3)}))
    assert error.value.key == "student_tap"
    with pytest.raises(MethodConfigError) as error:
        fitnet.check(defaults("fitnet", teacher_tap="pool"), context({"layer2": (8, 4, 4), "pool": (8,)}, {"layer2": (4, 4, 4)}))
    assert error.value.key == "teacher_tap"
    with pytest.raises(MethodConfigError) as error:
        fitnet.check(defaults("fitnet", student_tap="layer9"), context({"layer2": (8, 4, 4)}, {"layer2": (4, 4, 4)}))
    assert error.value.key == "student_tap"
    fitnet.check(defaults("fitnet"), pair_context())


# --- VID ------------------------------------------------------------------------------------------------

def test_vid_is_weighted_sum_over_pairs_of_mean_gaussian_nll_plus_weighted_cross_entropy() -> None:
    # Pair a: student (1, 1, 2) map x = [2, -3]; convs 1 -> 2 -> 2 -> 2 with weights [1, -1], identity,
    # identity give pred = [relu(x), relu(-x)] = channel 0 [2, 0], channel 1 [0, 3]. Teacher channel 0
    # [1, 1], channel 1 [0, 1]; variances 5 and 1. NLL entries 0.5 (d^2 / var + log var):
    # channel 0: 2 x 0.5 (1/5 + log 5) = 1.8094379; channel 1: 0 + 0.5 x 4 = 2. Mean over 4 = 0.9523595.
    # Pair b: student (1, 2, 2) map [1, 2, 3, 6] average-pooled to the teacher's 1x1 = 3; all weights 1
    # give pred 3; teacher 1; variance 5 (the start): 0.5 (4/5 + log 5) = 1.2047190.
    # Sum 2.1570785, x weight 2 = 4.3141569. CE of logits [0, 0, 0] on label 1 = log 3, x 0.5 = 0.5493061.
    params = defaults("vid", teacher_taps=["a", "b"], student_taps=["a", "b"], weight=2.0, ce_weight=0.5)
    method = method_class("vid")(params, context({"a": (2, 1, 2), "b": (1, 1, 1)}, {"a": (1, 1, 2), "b": (1, 2, 2)}))
    first, second = method.regressors
    with torch.no_grad():
        first.mean[0].weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        first.mean[2].weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        first.mean[4].weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        first.log_scale.copy_(torch.tensor([softplus_inverse(5.0 - 1e-5), softplus_inverse(1.0 - 1e-5)]))
        for conv in (second.mean[0], second.mean[2], second.mean[4]):
            conv.weight.fill_(1.0)
    student = {"a": torch.tensor([2.0, -3.0]).view(1, 1, 1, 2), "b": torch.tensor([1.0, 2.0, 3.0, 6.0]).view(1, 1, 2, 2)}
    teacher = {"a": torch.tensor([[1.0, 1.0], [0.0, 1.0]]).view(1, 2, 1, 2), "b": torch.ones(1, 1, 1, 1)}
    terms = method.loss(ModelOutput(torch.zeros(1, 3), student), ModelOutput(torch.zeros(1, 3), teacher),
                        Batch(torch.zeros(1), torch.tensor([1])))
    assert list(terms) == ["ce", "vid"]
    assert terms["vid"].item() == pytest.approx(4.3141569, abs=1e-5)
    assert terms["ce"].item() == pytest.approx(0.5493061, abs=1e-6)


def test_vid_variance_starts_at_init_pred_var_and_a_larger_teacher_map_is_pooled() -> None:
    method = method_class("vid")(defaults("vid", teacher_taps=["a"], student_taps=["a"], init_pred_var=3.0),
                                 context({"a": (1, 2, 2)}, {"a": (1, 1, 1)}))
    regressor = method.regressors[0]
    assert regressor.variance().flatten().tolist() == pytest.approx([3.0], rel=1e-6)
    # Teacher [0, 2, 4, 6] pools to 3; student 1 with all weights 1 predicts 1: 0.5 (4/3 + log 3) = 1.2159728.
    with torch.no_grad():
        for conv in (regressor.mean[0], regressor.mean[2], regressor.mean[4]):
            conv.weight.fill_(1.0)
    value = regressor(torch.ones(1, 1, 1, 1), torch.tensor([0.0, 2.0, 4.0, 6.0]).view(1, 1, 2, 2))
    assert value.item() == pytest.approx(1.2159728, abs=1e-5)


def test_vid_middle_width_is_the_teacher_s_channels_as_in_repdistiller() -> None:
    method = method_class("vid")(defaults("vid"), pair_context())
    assert [tuple(r.mean[0].weight.shape[:2]) for r in method.regressors] == [(16, 4), (32, 8), (64, 16)]
    assert [tuple(r.mean[4].weight.shape[:2]) for r in method.regressors] == [(16, 16), (32, 32), (64, 64)]
    assert method.teacher_taps == ("layer1", "layer2", "layer3") == method.student_taps


def test_vid_refuses_misfit_tap_lists() -> None:
    vid = method_class("vid")
    with pytest.raises(MethodConfigError) as error:
        vid.check(defaults("vid", student_taps=["layer1", "layer2"]), pair_context())
    assert error.value.key == "student_taps"
    with pytest.raises(MethodConfigError) as error:
        vid.check(defaults("vid", teacher_taps=[], student_taps=[]), pair_context())
    assert error.value.key == "teacher_taps"
    with pytest.raises(MethodConfigError) as error:
        vid.check(defaults("vid", teacher_taps=["layer1", "layer2", "pool"]), pair_context())
    assert error.value.key == "teacher_taps"
    with pytest.raises(MethodConfigError) as error:
        vid.check(defaults("vid", init_pred_var=1e-6), pair_context())
    assert error.value.key == "init_pred_var"


# --- the regressors train with the student --------------------------------------------------------------

@pytest.mark.parametrize("name", METHOD_NAMES)
def test_regressor_gets_gradients_and_is_saved_with_the_method(name: str) -> None:
    torch.manual_seed(0)
    method = method_class(name)(defaults(name), pair_context())
    method.train()
    student = {tap: torch.randn(4, *STUDENT_SHAPES[tap], requires_grad=True) for tap in method.student_taps}
    teacher = {tap: torch.randn(4, *TEACHER_SHAPES[tap]) for tap in method.teacher_taps}
    logits = torch.randn(4, 10, requires_grad=True)
    terms = method.loss(ModelOutput(logits, student), ModelOutput(torch.randn(4, 10), teacher),
                        Batch(torch.zeros(4), torch.tensor([0, 1, 2, 3])))
    sum(terms.values()).backward()
    named = dict(method.named_parameters())
    assert named and all(key.startswith("regressor") for key in named)
    for key, parameter in named.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, key
    assert set(named) <= set(method.state_dict())
    assert all(feature.grad is not None and feature.grad.abs().sum() > 0 for feature in student.values())


@pytest.mark.parametrize(("name", "terms"), [("fitnet", {"ce", "fitnet"}), ("vid", {"ce", "vid"})])
def test_method_trains_a_student_on_digits_with_falling_finite_loss(
    name: str, terms: set[str], tiny_in_process, restore_torch_threads, tmp_path: Path
) -> None:
    log = train_student_on_digits(tiny_in_process, tmp_path, name, epochs=3)
    epochs = log["epochs"]
    assert len(epochs) == 3
    for entry in epochs:
        assert set(entry["terms"]) == terms
        assert all(math.isfinite(value) for value in entry["terms"].values())
        assert math.isfinite(entry["train_loss"])
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
