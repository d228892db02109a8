"""feature_only (Cooper et al., NeurReps 2025): the feature term against numbers worked out by hand, the
detached head (which parameters cross-entropy reaches), the optional KD term, the pca projection read
from a pre-stage folder, the refusals, and short training runs on digits (conv1x1; pca through the
fit_pca stage)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from distill.base import Batch, MethodConfigError, MethodContext, ModelOutput, method_class
from models.registry import build_model, tap_shapes
from models.taps import FeatureTaps
from pipeline.logfiles import read_log
from pipeline.plan import build_plan
from pipeline.store import StageFolders
from stages import run_stage
from stages.files import load_torch, save_torch
from stages.train_student import detach_output_of
from tests.conftest import copy_stage, train_student_on_digits, write_sweep

FEATURE_ONLY = method_class("feature_only")


def params(**overrides: object) -> dict[str, object]:
    values = {key: spec["default"] for key, spec in FEATURE_ONLY.METHOD["params"].items()}
    values.update(overrides)
    return values


def context(teacher: dict, student: dict, pre_stage_dir: str | None = None) -> MethodContext:
    return MethodContext(num_classes=3, teacher_tap_shapes=teacher, student_tap_shapes=student, pre_stage_dir=pre_stage_dir)


def labelled(size: int) -> Batch:
    return Batch(torch.zeros(size, 1, 8, 8), torch.zeros(size, dtype=torch.long))


def output(features: dict[str, torch.Tensor], logits: torch.Tensor | None = None) -> ModelOutput:
    size = next(iter(features.values())).shape[0]
    return ModelOutput(torch.zeros(size, 3) if logits is None else logits, features)


# --- the declaration ------------------------------------------------------------------------------------

def test_defaults_follow_the_released_main_runs() -> None:
    declared = {key: spec["default"] for key, spec in FEATURE_ONLY.METHOD["params"].items()}
    assert declared["projection"] == "conv1x1"  # ProjectorArchitecture SingleLayerConv
    assert (declared["detach_head"], declared["feature_weight"], declared["ce_weight"]) == (True, 1.0, 1.0)
    assert (declared["kd_weight"], declared["temperature"]) == (0.0, 4.0)
    assert FEATURE_ONLY.METHOD["pre_stage"] == {"kind": "fit_pca", "params": ["teacher_taps"], "when": {"projection": "pca"}}


# --- the feature term by hand ---------------------------------------------------------------------------

def test_feature_term_is_the_mean_over_pairs_of_mse_with_the_larger_map_pooled() -> None:
    # Pair 1 (same size): student [[1, 2], [3, 4]], teacher [[1, 0], [3, 8]]: squared errors 0, 4, 0, 16 -> 5.
    # Pair 2: teacher 2x4 [[1, 3, 5, 7], [1, 3, 5, 7]] pools (2x2 blocks) to [2, 6]; student [4, 6]:
    # squared errors 4, 0 -> 2. Mean over the two pairs: 3.5, times feature_weight 2 = 7.
    student = {"a": torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]), "b": torch.tensor([[[[4.0, 6.0]]]])}
    teacher = {"x": torch.tensor([[[[1.0, 0.0], [3.0, 8.0]]]]),
               "y": torch.tensor([[[[1.0, 3.0, 5.0, 7.0], [1.0, 3.0, 5.0, 7.0]]]])}
    method = FEATURE_ONLY(
        params(teacher_taps=["x", "y"], student_taps=["a", "b"], projection="none", feature_weight=2.0),
        context({"x": (1, 2, 2), "y": (1, 2, 4)}, {"a": (1, 2, 2), "b": (1, 1, 2)}),
    )
    terms = method.loss(output(student), output(teacher), labelled(1))
    assert list(terms) == ["ce", "feature"]
    assert terms["feature"].item() == pytest.approx(7.0)
    assert terms["ce"].item() == pytest.approx(math.log(3.0))


def test_conv1x1_projects_the_student_before_the_mse() -> None:
    # Student channels (1, 2) at one position, weights [[1, 1], [2, -1]] -> (3, 0); teacher (1, 4):
    # squared errors 4 and 16, mean 10.
    method = FEATURE_ONLY(params(teacher_taps=["x"], student_taps=["a"]), context({"x": (2, 1, 1)}, {"a": (2, 1, 1)}))
    with torch.no_grad():
        method.projections[0].weight.copy_(torch.tensor([[1.0, 1.0], [2.0, -1.0]]).view(2, 2, 1, 1))
    student = {"a": torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)}
    teacher = {"x": torch.tensor([1.0, 4.0]).view(1, 2, 1, 1)}
    assert method.loss(output(student), output(teacher), labelled(1))["feature"].item() == pytest.approx(10.0)


def test_kd_term_is_off_by_default_and_the_batch_mean_kl_without_t_squared_when_on() -> None:
    shapes = {"x": (1, 1, 1)}
    features = {"x": torch.zeros(2, 1, 1, 1)}
    student_logits = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]])
    teacher_logits = torch.tensor([[0.0, 4.0, 0.0], [2.0, 0.0, 2.0]])
    off = FEATURE_ONLY(params(teacher_taps=["x"], student_taps=["x"], projection="none"), context(shapes, shapes))
    assert "kd" not in off.loss(output(features, student_logits), output(features, teacher_logits), labelled(2))
    on = FEATURE_ONLY(params(teacher_taps=["x"], student_taps=["x"], projection="none", kd_weight=16.0), context(shapes, shapes))
    terms = on.loss(output(features, student_logits), output(features, teacher_logits), labelled(2))
    kl = 0.0
    for s_row, t_row in zip(student_logits.tolist(), teacher_logits.tolist()):
        p_s = [math.exp(v / 4) / sum(math.exp(u / 4) for u in s_row) for v in s_row]
        p_t = [math.exp(v / 4) / sum(math.exp(u / 4) for u in t_row) for v in t_row]
        kl += sum(t * math.log(t / s) for s, t in zip(p_s, p_t)) / 2
    assert terms["kd"].item() == pytest.approx(16.0 * kl, rel=1e-5)


# --- the detached head ----------------------------------------------------------------------------------

def digits_context() -> MethodContext:
    return MethodContext(10, tap_shapes("resnet20", (1, 8, 8), 10), tap_shapes("resnet8x0.25", (1, 8, 8), 10))


def _gradients_after(loss_name: str, detach_head: bool) -> dict[str, bool]:
    """Which student module groups get a non-zero gradient from one term, through the training loop's
    own hook (stages.train_student.detach_output_of)."""
    torch.manual_seed(0)
    student, teacher = build_model("resnet8x0.25", 10, (1, 8, 8)), build_model("resnet20", 10, (1, 8, 8)).eval()
    method = FEATURE_ONLY(params(detach_head=detach_head, kd_weight=1.0), digits_context())
    student_taps = FeatureTaps(student, method.student_taps)
    if method.detached_student_tap is not None:
        detach_output_of(student, method.detached_student_tap)
    images, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        teacher_output = ModelOutput(*FeatureTaps(teacher, method.teacher_taps)(images))
    terms = method.loss(ModelOutput(*student_taps(images)), teacher_output, Batch(images, labels))
    terms[loss_name].backward()
    groups = {"stem": student.stem, "layer1": student.layer1, "layer3": student.layer3, "fc": student.fc}
    return {
        name: any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
        for name, module in groups.items()
    }


def test_detached_head_keeps_cross_entropy_and_kd_above_the_last_distilled_tap() -> None:
    assert FEATURE_ONLY(params(), digits_context()).detached_student_tap == "layer3"
    for term in ("ce", "kd"):
        assert _gradients_after(term, detach_head=True) == {"stem": False, "layer1": False, "layer3": False, "fc": True}
    assert _gradients_after("feature", detach_head=True) == {"stem": True, "layer1": True, "layer3": True, "fc": False}


def test_attached_head_lets_cross_entropy_train_the_whole_student() -> None:
    assert FEATURE_ONLY(params(detach_head=False), digits_context()).detached_student_tap is None
    assert _gradients_after("ce", detach_head=False) == {"stem": True, "layer1": True, "layer3": True, "fc": True}


# --- pca: the teacher projected onto the pre-stage's components -----------------------------------------

def test_pca_reads_the_pre_stage_fit_and_projects_the_teacher_onto_its_top_student_channels(tmp_path: Path) -> None:
    mean = torch.tensor([1.0, 2.0, 3.0])
    components = torch.tensor([[0.0, 1.0, 0.0], [0.6, 0.0, 0.8], [0.8, 0.0, -0.6]])
    save_torch(tmp_path / "final.pt", {"taps": {"x": {"mean": mean, "components": components,
                                                       "explained_variance": torch.tensor([3.0, 2.0, 1.0])}}})
    method = FEATURE_ONLY(params(teacher_taps=["x"], student_taps=["a"], projection="pca"),
                          context({"x": (3, 1, 2)}, {"a": (2, 1, 2)}, pre_stage_dir=str(tmp_path)))
    teacher = torch.tensor([[[[2.0, 1.0]], [[4.0, 2.0]], [[8.0, 3.0]]]])
    student = torch.tensor([[[[1.0, 0.0]], [[4.0, 1.0]]]], requires_grad=True)
    # By hand: (x - mean) @ V_2^T per position, (1, 2, 5) -> (2, 4.6) and (0, 0, 0) -> (0, 0); squared
    # errors against the student (1, 4.0 | 0, 1): 1, 0.36, 0, 1 -> mean 0.59.
    feature = method.loss(output({"a": student}), output({"x": teacher}), labelled(1))["feature"]
    assert feature.item() == pytest.approx(0.59, abs=1e-6)
    feature.backward()
    assert student.grad is not None and not list(method.parameters())  # nothing learned on the teacher side


def test_pca_without_a_pre_stage_keeps_placeholders_that_a_saved_state_replaces() -> None:
    shapes = context({"x": (3, 1, 1)}, {"a": (2, 1, 1)})
    placeholder = FEATURE_ONLY(params(teacher_taps=["x"], student_taps=["a"], projection="pca"), shapes)
    assert placeholder.projections[0].components.tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    saved = placeholder.state_dict()
    saved["projections.0.mean"] = torch.tensor([1.0, 1.0, 1.0])
    rebuilt = FEATURE_ONLY(params(teacher_taps=["x"], student_taps=["a"], projection="pca"), shapes)
    rebuilt.load_state_dict(saved)
    assert rebuilt.projections[0].mean.tolist() == [1.0, 1.0, 1.0]


# --- refusals -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "teacher", "student", "key"), [
    ({"projection": "none"}, {"x": (8, 2, 2)}, {"a": (4, 2, 2)}, "projection"),
    ({"projection": "pca"}, {"x": (4, 2, 2)}, {"a": (8, 2, 2)}, "projection"),
    ({"student_taps": ["a", "a"]}, {"x": (8, 2, 2)}, {"a": (4, 2, 2)}, "student_taps"),
    ({"teacher_taps": ["pool"], "student_taps": ["a"]}, {"pool": (8,)}, {"a": (4, 2, 2)}, "teacher_taps"),
])
def test_refuses_settings_that_cannot_fit_these_taps(overrides: dict, teacher: dict, student: dict, key: str) -> None:
    settings = params(teacher_taps=["x"], student_taps=["a"])
    settings.update(overrides)
    with pytest.raises(MethodConfigError) as error:
        FEATURE_ONLY.check(settings, context(teacher, student))
    assert error.value.key == key


@pytest.mark.parametrize("detach_head", [False, True])
def test_generalised_layer_indices_are_taps_like_names(detach_head: bool) -> None:
    FEATURE_ONLY.check(params(teacher_taps=[3], student_taps=[3], detach_head=detach_head), context({3: (8, 2, 2)}, {3: (4, 2, 2)}))


# --- training on digits ---------------------------------------------------------------------------------

def _assert_trains(log: dict, terms: set[str]) -> None:
    epochs = log["epochs"]
    assert len(epochs) == 3
    for entry in epochs:
        assert set(entry["terms"]) == terms
        assert all(math.isfinite(value) for value in entry["terms"].values())
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]


def test_trains_a_student_on_digits_with_conv1x1(tiny_in_process, restore_torch_threads, tmp_path: Path) -> None:
    _assert_trains(train_student_on_digits(tiny_in_process, tmp_path, "feature_only", {"projection": "conv1x1"}, epochs=3),
                   {"ce", "feature"})


def test_fit_pca_stage_feeds_a_pca_student_on_digits(tiny_in_process, restore_torch_threads, tmp_path: Path) -> None:
    changes = {"axes.method": ["feature_only"], "defaults.student.epochs": 3,
               "defaults.methods.feature_only": {"projection": "pca"}}
    plan = build_plan(write_sweep(tmp_path / "pca.yaml", changes))
    root = tmp_path / "out"
    for name, spec in plan.stages.items():
        if spec.kind == "train_teacher":
            copy_stage(tiny_in_process.root, root, name)
    for spec in plan.stages.values():
        if spec.kind in ("fit_pca", "train_student"):
            run_stage(spec, root)
    fit_stage = next(spec for spec in plan.stages.values() if spec.kind == "fit_pca")
    fit_folders = StageFolders(root, fit_stage.name)
    fits = load_torch(fit_folders.final_weights)["taps"]
    assert set(fits) == {"layer1", "layer2", "layer3"}
    for tap, channels in (("layer1", 16), ("layer2", 32), ("layer3", 64)):
        fit = fits[tap]
        assert fit["components"].shape == (channels, channels) and fit["mean"].shape == (channels,)
        assert torch.all(fit["explained_variance"][:-1] >= fit["explained_variance"][1:])
    ratios = read_log(fit_folders.logs)["explained_variance_ratio"]
    assert all(sum(ratio) == pytest.approx(1.0) for ratio in ratios.values())
    student = next(spec for spec in plan.stages.values() if spec.kind == "train_student")
    _assert_trains(read_log(StageFolders(root, student.name).logs), {"ce", "feature"})
    saved = load_torch(StageFolders(root, student.name).final_weights)["method"]
    assert torch.allclose(saved["projections.0.components"], fits["layer1"]["components"][:4].float())


def test_a_layer_named_by_its_index_is_detached_like_one_named_by_its_module() -> None:
    from models.registry import build_model, generalised_layers

    model = build_model("resnet8x0.25", num_classes=10, image_shape=(1, 8, 8))
    index = generalised_layers(model).index("layer2")
    detach_output_of(model, index)
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    assert all(parameter.grad is None for parameter in model.layer1.parameters())
    assert all(parameter.grad is None for parameter in model.layer2.parameters())
    assert any(parameter.grad is not None for parameter in model.layer3.parameters())


def test_only_a_pca_projection_brings_a_fit_pca_stage_and_every_pca_student_of_the_teacher_shares_it(tmp_path: Path) -> None:
    axes = {"dataset": ["digits"], "pair": ["resnet20:resnet8x0.25"], "method": ["feature_only"], "seed": [0, 1],
            "methods.feature_only.projection": ["conv1x1", "pca"]}
    plan = build_plan(write_sweep(tmp_path / "projections.yaml", {"axes": axes}))
    fits = [name for name, spec in plan.stages.items() if spec.kind == "fit_pca"]
    assert len(fits) == 1
    for experiment in plan.experiments:
        upstream = plan.stages[experiment.student_stage].upstream
        projection = experiment.axis_values["methods.feature_only.projection"]
        assert upstream.get("paraphraser") == (fits[0] if projection == "pca" else None)
