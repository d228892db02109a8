"""SimKD: the feature term and the reused-head prediction against numbers worked out by hand or with plain
tensor maths, the head kept frozen (or fine-tuned), the deployed network and its parameter count, the
refusals, and a digits student trained, saved, rebuilt and evaluated through the teacher's head."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill.base import Batch, MethodConfigError, MethodContext, ModelOutput, method_class
from distill.composition import build_method
from models.registry import build_model, parameter_count, tap_shapes
from stages.train_student import distillation_terms
from tests.conftest import train_student_on_digits

TEACHER_SHAPES = tap_shapes("resnet20", (1, 8, 8), 10)
STUDENT_SHAPES = tap_shapes("resnet8x0.25", (1, 8, 8), 10)
BN_EPS = 1e-5


def defaults(**overrides: object) -> dict[str, object]:
    params = {key: spec["default"] for key, spec in method_class("simkd").METHOD["params"].items()}
    params.update(overrides)
    return params


def pair_context(teacher: nn.Module | None = None, num_classes: int = 10) -> MethodContext:
    return MethodContext(num_classes=num_classes, teacher_tap_shapes=TEACHER_SHAPES, student_tap_shapes=STUDENT_SHAPES,
                         teacher=teacher)


def teacher_network(classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("resnet20", classes, (1, 8, 8)).eval().requires_grad_(False)


def small_method(student: tuple[int, int, int], teacher: tuple[int, int, int], **overrides: object) -> nn.Module:
    """A 1-channel student map and a 2-channel teacher map (factor 2: one middle channel), with the projector
    set to x -> [relu(x), 2 relu(x)] (eval-mode BN that divides by exactly 1) and a 2 -> 3 head."""
    context = MethodContext(num_classes=3, teacher_tap_shapes={"layer3": teacher, "fc": (3,)},
                            student_tap_shapes={"layer3": student})
    method = method_class("simkd")(defaults(**overrides), context).eval()
    first, _, _, middle, _, _, last, _, _ = method.top.projector
    with torch.no_grad():
        first.weight.fill_(1.0)
        middle.weight.zero_()
        middle.weight[0, 0, 1, 1] = 1.0  # the 3x3 kernel's centre: an identity
        last.weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
        for module in method.top.projector:
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.zero_()
                module.running_var.fill_(1.0 - BN_EPS)
        method.top.head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        method.top.head.bias.copy_(torch.tensor([0.0, 0.0, -1.0]))
    return method


# --- the loss and the prediction against hand-worked numbers ------------------------------------------

def test_simkd_term_is_weighted_mean_squared_error_and_ce_is_on_the_heads_prediction() -> None:
    # Student map x = [1, -1, 2, 0] (1 channel, 2x2): projected channel 0 = relu(x) = [1, 0, 2, 0], channel 1 =
    # [2, 0, 4, 0]. Teacher: channel 0 all 1, channel 1 all 0. Squared errors [0, 1, 1, 1] + [4, 0, 16, 0] = 23
    # over 8 entries = 2.875 (nn.MSELoss's mean), x weight 2 = 5.75.
    # Pooled projection [0.75, 1.5] -> head logits [0.75, 1.5, 1.25]; CE on label 1 = logsumexp - 1.5, x 0.5.
    method = small_method((1, 2, 2), (2, 2, 2), weight=2.0, ce_weight=0.5)
    student_map = torch.tensor([1.0, -1.0, 2.0, 0.0]).view(1, 1, 2, 2)
    teacher_map = torch.stack([torch.ones(2, 2), torch.zeros(2, 2)]).unsqueeze(0)
    student = ModelOutput(torch.zeros(1, 3), {"layer3": student_map})
    terms = method.loss(student, ModelOutput(torch.zeros(1, 3), {"layer3": teacher_map}),
                        Batch(torch.zeros(1), torch.tensor([1])))
    assert set(terms) == {"ce", "simkd"}
    assert terms["simkd"].item() == pytest.approx(5.75, rel=1e-5)
    cross_entropy = math.log(math.exp(0.75) + math.exp(1.5) + math.exp(1.25)) - 1.5
    assert terms["ce"].item() == pytest.approx(0.5 * cross_entropy, rel=1e-5)
    assert method.student_logits(student)[0].tolist() == pytest.approx([0.75, 1.5, 1.25], rel=1e-5)


def test_the_larger_map_is_average_pooled_to_the_smaller_ones_size() -> None:
    # Teacher larger (4x4 vs 2x2): the target is the teacher's 2x2 block means.
    method = small_method((1, 2, 2), (2, 4, 4))
    student_map = torch.tensor([1.0, -1.0, 2.0, 0.0]).view(1, 1, 2, 2)
    teacher_map = torch.arange(32.0).view(1, 2, 4, 4)
    blocks = teacher_map.view(1, 2, 2, 2, 2, 2).mean(dim=(3, 5))  # (1, 2, 2 rows, 2 cols) of 2x2 block means
    projected = torch.stack([student_map[0, 0].relu(), 2 * student_map[0, 0].relu()]).unsqueeze(0)
    terms = method.loss(ModelOutput(torch.zeros(1, 3), {"layer3": student_map}),
                        ModelOutput(torch.zeros(1, 3), {"layer3": teacher_map}), Batch(torch.zeros(1), torch.tensor([0])))
    assert terms["simkd"].item() == pytest.approx(((projected - blocks) ** 2).mean().item(), rel=1e-5)
    # Student larger (4x4 vs 2x2): the student's map is pooled before the projector.
    method = small_method((1, 4, 4), (2, 2, 2))
    student_map = torch.arange(16.0).view(1, 1, 4, 4) - 5.0
    pooled = student_map.view(2, 2, 2, 2).mean(dim=(1, 3)).relu()
    logits = method.student_logits(ModelOutput(torch.zeros(1, 3), {"layer3": student_map}))
    channels = torch.stack([pooled.mean(), 2 * pooled.mean()])
    assert logits[0].tolist() == pytest.approx([channels[0].item(), channels[1].item(), channels.sum().item() - 1.0], rel=1e-5)


def batch_norm(x: torch.Tensor, module: nn.BatchNorm2d) -> torch.Tensor:
    """Eval-mode BN by its formula."""
    shape = (1, -1, 1, 1)
    normalised = (x - module.running_mean.view(shape)) / torch.sqrt(module.running_var.view(shape) + module.eps)
    return normalised * module.weight.view(shape) + module.bias.view(shape)


def reference_logits(method: nn.Module, teacher: nn.Module, student_map: torch.Tensor) -> torch.Tensor:
    """teacher_fc(avgpool(projector(student_map))) with the projector written out: conv, BN, ReLU x 3."""
    conv1, bn1, _, conv2, bn2, _, conv3, bn3, _ = method.top.projector
    x = batch_norm(F.conv2d(student_map, conv1.weight), bn1).relu()
    x = batch_norm(F.conv2d(x, conv2.weight, padding=1), bn2).relu()
    x = batch_norm(F.conv2d(x, conv3.weight), bn3).relu()
    return x.mean(dim=(2, 3)) @ teacher.fc.weight.T + teacher.fc.bias


def test_logits_and_the_deployed_network_are_the_teacher_head_on_the_pooled_projection() -> None:
    teacher = teacher_network()
    method = method_class("simkd")(defaults(), pair_context(teacher))
    with torch.no_grad():  # non-trivial BN statistics, so eval mode is seen to use them
        for module in method.top.projector:
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    method.eval()
    torch.manual_seed(1)
    student = build_model("resnet8x0.25", 10, (1, 8, 8)).eval()
    images = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        student_map = student.layer3(student.layer2(student.layer1(student.stem(images))))
        expected = reference_logits(method, teacher, student_map)
        logits = method.student_logits(ModelOutput(student(images), {"layer3": student_map}))
        deployed = method.deployed(student)(images)
    assert torch.allclose(logits, expected, atol=1e-5)
    assert torch.allclose(deployed, expected, atol=1e-5)
    assert not torch.allclose(deployed, student(images), atol=1e-3)  # not the student's own classifier


def test_a_training_step_runs_the_projector_once() -> None:
    # student_logits reuses the loss's prediction, so BN's running statistics move once per step.
    teacher = teacher_network()
    method = method_class("simkd")(defaults(ce_weight=1.0), pair_context(teacher)).train()
    student = build_model("resnet8x0.25", 10, (1, 8, 8)).train()
    compute_terms = distillation_terms(student, teacher, method)
    terms, logits = compute_terms(torch.randn(6, 1, 8, 8), torch.arange(6), 0, torch.arange(6), torch.Generator())
    assert all(module.num_batches_tracked.item() == 1 for module in method.top.projector if isinstance(module, nn.BatchNorm2d))
    assert logits.shape == (6, 10) and not logits.requires_grad
    assert set(terms) == {"ce", "simkd"}


# --- the reused head -------------------------------------------------------------------------------------

@pytest.mark.parametrize("learn", [False, True])
def test_the_head_is_the_teachers_and_stays_frozen_unless_it_is_learned(learn: bool) -> None:
    teacher = teacher_network()
    teacher_weight, teacher_bias = teacher.fc.weight.clone(), teacher.fc.bias.clone()
    method = method_class("simkd")(defaults(ce_weight=1.0, learn_teacher_classifier=learn), pair_context(teacher))
    assert torch.equal(method.top.head.weight, teacher_weight) and torch.equal(method.top.head.bias, teacher_bias)
    assert method.top.head.weight.requires_grad is learn
    student = build_model("resnet8x0.25", 10, (1, 8, 8))
    modules = nn.ModuleDict({"model": student, "method": method})
    trainable = [parameter for parameter in modules.parameters() if parameter.requires_grad]  # as EpochLoop picks them
    assert any(parameter is method.top.head.weight for parameter in trainable) is learn
    optimizer = torch.optim.SGD(trainable, lr=0.1, momentum=0.9, weight_decay=5e-4)
    compute_terms = distillation_terms(student, teacher, method)
    generator = torch.Generator().manual_seed(0)
    modules.train()
    for step in range(3):
        terms, _ = compute_terms(torch.randn(8, 1, 8, 8, generator=generator), torch.randint(0, 10, (8,), generator=generator), 0, torch.arange(8), torch.Generator())
        optimizer.zero_grad()
        sum(terms.values()).backward()
        optimizer.step()
    assert torch.equal(method.top.head.weight, teacher_weight) is not learn
    assert torch.equal(method.top.head.bias, teacher_bias) is not learn
    assert torch.equal(teacher.fc.weight, teacher_weight)  # the head is a copy: the teacher never changes


def test_the_deployed_parameter_count_is_student_plus_projector_plus_head() -> None:
    # Student layer3 has 16 channels, teacher 64, factor 2 -> 32 middle channels; convolutions have no bias.
    projector = 16 * 32 + 2 * 32 + 32 * 32 * 9 + 2 * 32 + 32 * 64 + 2 * 64
    head = 64 * 10 + 10
    method = method_class("simkd")(defaults(), pair_context(teacher_network()))
    student = build_model("resnet8x0.25", 10, (1, 8, 8))
    assert parameter_count(method.deployed(student)) == parameter_count(student) + projector + head


def test_a_method_rebuilt_without_the_teacher_restores_the_head_from_its_state() -> None:
    trained = method_class("simkd")(defaults(), pair_context(teacher_network(seed=3)))
    rebuilt = method_class("simkd")(defaults(), pair_context())
    assert not torch.equal(rebuilt.top.head.weight, trained.top.head.weight)
    rebuilt.load_state_dict(trained.state_dict())
    assert torch.equal(rebuilt.top.head.weight, trained.top.head.weight)


# --- refusals --------------------------------------------------------------------------------------------

def test_a_teacher_trained_on_another_class_count_is_refused_naming_the_key() -> None:
    with pytest.raises(MethodConfigError) as error:
        method_class("simkd")(defaults(), pair_context(teacher_network(classes=5)))
    assert error.value.key == "teacher_head"
    assert "5 classes" in str(error.value) and "10" in str(error.value)
    with pytest.raises(MethodConfigError) as error:
        build_method({"name": "simkd", "params": defaults()}, pair_context(teacher_network(classes=5)))
    assert error.value.key == "simkd.teacher_head"


@pytest.mark.parametrize(("overrides", "key"), [
    ({"learn_teacher_classifier": True}, "learn_teacher_classifier"),  # ce_weight 0: nothing would train the head
    ({"factor": 65}, "factor"),
    ({"teacher_tap": "layer2"}, "teacher_tap"),  # 32 channels; the head reads 64
    ({"teacher_head": "layer3"}, "teacher_head"),  # a map, not a classifier
    ({"student_tap": "pool"}, "student_tap"),  # not a (C, H, W) map
])
def test_settings_that_cannot_work_are_refused_naming_the_key(overrides: dict[str, object], key: str) -> None:
    with pytest.raises(MethodConfigError) as error:
        method_class("simkd").check(defaults(**overrides), pair_context(teacher_network()))
    assert error.value.key == key


# --- a digits student, trained, rebuilt and evaluated -----------------------------------------------------

def test_simkd_trains_on_digits_and_is_evaluated_as_student_projector_and_head(
    tiny_in_process, restore_torch_threads, tmp_path: Path
) -> None:
    from pipeline.plan import build_plan
    from pipeline.store import StageFolders
    from stages import run_stage
    from stages.files import load_torch
    from stages.loading import load_classifier, load_stage_data
    from stages.training import accuracy, predict

    log = train_student_on_digits(tiny_in_process, tmp_path, "simkd", epochs=3)
    epochs = log["epochs"]
    assert len(epochs) == 3
    for entry in epochs:
        assert set(entry["terms"]) == {"ce", "simkd"} and entry["terms"]["ce"] == 0.0
        assert all(math.isfinite(value) for value in entry["terms"].values())
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]

    plan = build_plan(tmp_path / "simkd.yaml")  # the sweep train_student_on_digits wrote
    root = tmp_path / "out"
    student_spec = next(spec for spec in plan.stages.values() if spec.kind == "train_student")
    teacher_spec = next(spec for spec in plan.stages.values() if spec.kind == "train_teacher")
    student_folders, teacher_folders = StageFolders(root, student_spec.name), StageFolders(root, teacher_spec.name)

    # The logged val accuracy is the deployed network's, rebuilt from final.pt as evaluation rebuilds it.
    data = load_stage_data(student_spec)
    deployed = load_classifier(student_folders.final_weights, torch.device("cpu")).model
    assert epochs[-1]["val_acc"] == pytest.approx(accuracy(predict(deployed, data.split_images("val", 256), torch.device("cpu"), data.normalise), data.val_labels))
    # The head left training as the teacher's classifier.
    saved, teacher_saved = load_torch(student_folders.final_weights), load_torch(teacher_folders.final_weights)
    assert torch.equal(saved["method"]["top.head.weight"], teacher_saved["model"]["fc.weight"])
    assert torch.equal(saved["method"]["top.head.bias"], teacher_saved["model"]["fc.bias"])

    evaluate_spec = next(spec for spec in plan.stages.values() if spec.kind == "evaluate" and spec.upstream["model"] == student_spec.name)
    run_stage(evaluate_spec, root)
    result = json.loads(StageFolders(root, evaluate_spec.name).result.read_text())
    projector_and_head = (16 * 32 + 2 * 32 + 32 * 32 * 9 + 2 * 32 + 32 * 64 + 2 * 64) + (64 * 10 + 10)
    assert result["parameters"] == parameter_count(build_model("resnet8x0.25", 10, (1, 8, 8))) + projector_and_head
    assert result["top1_last"] == pytest.approx(epochs[-1]["test_acc"])
