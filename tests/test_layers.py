"""Generalised layers: the planner's torch-free list, the model's own, taps by index, plan-time checks
and ``runner.py layers``."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from models.registry import LAYER_INDEX, build_model, generalised_layers, layer_index, tap_shapes
from models.taps import FeatureTaps
from pipeline.catalogue import CatalogueError, load_catalogue
from pipeline.plan import build_plan
from pipeline.sweep import SweepError
from tests.conftest import (
    REPO,
    TINY_SWEEP,
    run_runner,
    train_student_on_digits,
    write_sweep,
)

CATALOGUE = load_catalogue()


@pytest.mark.parametrize("arch", sorted(CATALOGUE.architectures))
def test_the_planners_list_is_the_one_read_off_the_built_network(arch: str) -> None:
    assert CATALOGUE.architectures[arch].layers == generalised_layers(arch)


def test_the_committed_layer_index_is_the_built_networks() -> None:
    assert json.loads(LAYER_INDEX.read_text()) == layer_index(), "rewrite it: .venv/bin/python -m models.registry"


def test_resnet20_layers_by_hand() -> None:
    blocks = [f"layer{stage}.{block}" for stage in (1, 2, 3) for block in (0, 1)]
    assert CATALOGUE.architectures["resnet20"].layers == (
        "stem", *blocks[0:2], "layer1", *blocks[2:4], "layer2", *blocks[4:6], "layer3", "pool", "fc"
    )
    assert len(CATALOGUE.architectures["resnet110"].layers) == 1 + 3 * 18 + 2


def test_every_declared_tap_is_a_generalised_layer() -> None:
    for architecture in CATALOGUE.architectures.values():
        assert set(architecture.taps) <= set(architecture.layers), architecture.name


class _Block(nn.Module):
    """A module with its own forward(): one layer, never split, whatever it holds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x)) + x


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.Conv2d(2, 2, 1), nn.Sequential(nn.BatchNorm2d(2), nn.GELU()))
        self.body = nn.Sequential(_Block(), nn.Conv2d(2, 2, 1))
        self.out = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(self.head(x)))


def test_cuts_follow_activations_blocks_and_top_level_children() -> None:
    # head: after the ReLU (head.1), after the GELU that ends head.3 and so head; body: after the
    # block, and at its end (a conv, no cut of its own); out: at its end only.
    assert generalised_layers(_Toy()) == ("head.1", "head", "body.0", "body", "out")


def test_layers_run_in_list_order() -> None:
    model = build_model("resnet20", num_classes=10, image_shape=(1, 8, 8)).eval()
    layers = generalised_layers(model)
    modules = dict(model.named_modules())
    order: list[str] = []
    handles = [modules[name].register_forward_hook(lambda *_, name=name: order.append(name)) for name in layers]
    model(torch.randn(2, 1, 8, 8))
    for handle in handles:
        handle.remove()
    assert order == list(layers)


def test_a_tap_by_index_reads_the_same_tensor_as_by_name() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, image_shape=(1, 8, 8)).eval()
    images = torch.randn(3, 1, 8, 8)
    with torch.no_grad(), FeatureTaps(model, [1, 3, 11]) as taps:
        logits, by_index = taps(images)
    with torch.no_grad(), FeatureTaps(model, ["layer1.0", "layer1.2", "fc"]) as taps:
        _, by_name = taps(images)
    assert set(by_index) == {1, 3, 11}
    assert torch.equal(by_index[1], by_name["layer1.0"])
    assert torch.equal(by_index[3], by_name["layer1.2"])
    assert torch.equal(by_index[11], logits)
    assert not torch.equal(by_index[1], by_index[3])


def test_a_name_and_its_index_together_each_get_the_tensor() -> None:
    model = build_model("resnet8x4", num_classes=10, image_shape=(3, 32, 32)).eval()
    with torch.no_grad(), FeatureTaps(model, ["layer2", 2]) as taps:
        _, features = taps(torch.randn(1, 3, 16, 16))
    assert features["layer2"] is features[2]


@pytest.mark.parametrize("index", [12, -1])
def test_an_index_outside_the_layers_is_refused_with_the_range(index: int) -> None:
    model = build_model("resnet20", num_classes=10, image_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=rf"tap {index} is out of range .* 12 generalised layers; allowed: 0\.\.11"):
        FeatureTaps(model, ["stem", index])
    assert all(not module._forward_hooks for module in model.modules())


def test_tap_shapes_are_keyed_by_name_and_by_index() -> None:
    shapes = tap_shapes("resnet8x4", (3, 32, 32), 100)
    by_hand = [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (256,), (100,)]
    names = ["stem", "layer1", "layer2", "layer3", "pool", "fc"]
    assert shapes == {**dict(zip(names, by_hand)), **dict(enumerate(by_hand))}


def test_tap_shapes_include_inner_layer_names() -> None:
    shapes = tap_shapes("resnet20", (1, 8, 8), 10)
    assert shapes["layer2.0"] == shapes[4] == (32, 4, 4)
    assert shapes["layer3"] == shapes[9] == (64, 2, 2)


# --- plan time ----------------------------------------------------------------------------------------

def _plan_at(tmp_path: Path, **params: object):
    return build_plan(write_sweep(tmp_path / "sweep.yaml", {"axes.method": ["at"], "defaults.methods.at": params}))


def test_an_index_out_of_range_is_refused_at_plan_time_with_the_range(tmp_path: Path) -> None:
    with pytest.raises(SweepError) as refused:
        _plan_at(tmp_path, teacher_taps=[1, 2, 3], student_taps=[1, 2, 99])
    message = str(refused.value)
    assert "\n" not in message
    assert "defaults.methods.at.student_taps: 99 is out of range for student resnet8x0.25's 6 generalised layers" in message
    assert "allowed: 0..5, stem, layer1, layer2, layer3, pool" in message


def test_the_teachers_range_is_its_own(tmp_path: Path) -> None:
    _plan_at(tmp_path, teacher_taps=[11], student_taps=[5])
    with pytest.raises(SweepError, match=r"12 is out of range for teacher resnet20's 12 generalised layers.*allowed: 0\.\.11"):
        _plan_at(tmp_path, teacher_taps=[12], student_taps=[5])


def test_a_negative_index_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SweepError, match=r"student_taps: -1 is negative; generalised layers count from 0"):
        _plan_at(tmp_path, student_taps=[1, -1, 3])


def test_a_tap_that_is_neither_name_nor_index_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SweepError, match=r"student_taps: must be a tap name or a generalised layer index, got float 1.5"):
        _plan_at(tmp_path, student_taps=[1, 1.5, 3])
    with pytest.raises(SweepError, match=r"'layer4' is not a tap of student resnet8x0.25, nor one of its 6 generalised layers"):
        _plan_at(tmp_path, student_taps=["layer1", "layer2", "layer4"])


def test_names_indices_and_inner_layer_names_mix_in_one_list(tmp_path: Path) -> None:
    plan = _plan_at(tmp_path, teacher_taps=["layer1.0", 6, "layer3"], student_taps=[1, "layer2", 3])
    student = next(spec for spec in plan.stages.values() if spec.kind == "train_student")
    assert '["layer1.0", 6, "layer3"]' in json.dumps(student.settings) and '[1, "layer2", 3]' in json.dumps(student.settings)


def test_an_index_for_a_single_tap_param_plans(tmp_path: Path) -> None:
    changes = {"axes.method": ["fitnet"], "defaults.methods.fitnet": {"teacher_tap": 6, "student_tap": 2}}
    build_plan(write_sweep(tmp_path / "sweep.yaml", changes))
    changes["defaults.methods.fitnet"] = {"teacher_tap": 6, "student_tap": 6}
    with pytest.raises(SweepError, match=r"student_tap: 6 is out of range for student resnet8x0.25's 6 generalised layers"):
        build_plan(write_sweep(tmp_path / "sweep.yaml", changes))


def test_an_index_on_an_axis_is_checked_too(tmp_path: Path) -> None:
    axes = {**TINY_SWEEP["axes"], "method": ["fitnet"], "methods.fitnet.student_tap": ["layer2", 3, 7]}
    with pytest.raises(SweepError, match=r"axes.methods.fitnet.student_tap\[2\]: 7 is out of range"):
        build_plan(write_sweep(tmp_path / "sweep.yaml", {"axes": axes}))


def test_a_tap_name_sweep_still_plans(tmp_path: Path) -> None:
    plan = _plan_at(tmp_path, teacher_taps=["layer1", "layer2", "layer3"], student_taps=["stem", "layer2", "pool"])
    assert any(spec.kind == "train_student" for spec in plan.stages.values())
    assert len(build_plan(REPO / "configs" / "demo.yaml").stages) > 0


def test_an_architecture_missing_from_the_layer_index_is_refused(tmp_path: Path) -> None:
    for folder in ("distill", "data", "models"):
        (tmp_path / folder).mkdir()
    (tmp_path / "models" / "odd.py").write_text('ARCHITECTURES = {"odd9": {"taps": [], "min_image_size": 8}}\n')
    (tmp_path / "models" / "layer_index.json").write_text('{"other": ["fc"]}\n')
    with pytest.raises(CatalogueError, match=r"ARCHITECTURES\['odd9'\]: has no entry in models/layer_index.json; "
                                             r"rewrite it with: python -m models.registry"):
        load_catalogue(tmp_path)


def test_a_declared_tap_that_is_no_layer_is_refused(tmp_path: Path) -> None:
    for folder in ("distill", "data", "models"):
        (tmp_path / folder).mkdir()
    (tmp_path / "models" / "odd.py").write_text('ARCHITECTURES = {"odd9": {"taps": ["pool"], "min_image_size": 8}}\n')
    (tmp_path / "models" / "layer_index.json").write_text('{"odd9": ["stem", "fc"]}\n')
    with pytest.raises(CatalogueError, match=r"ARCHITECTURES\['odd9'\].taps: \['pool'\] are not generalised layers"):
        load_catalogue(tmp_path)


# --- runner.py layers ---------------------------------------------------------------------------------

def test_runner_layers_prints_each_layer_with_its_shape() -> None:
    result = run_runner("layers", "resnet8x4")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "resnet8x4: 6 generalised layers, output per sample for cifar100 images (3x32x32)"
    rows = [line.split(None, 3) for line in lines[2:]]
    assert rows == [
        ["0", "stem", "(32,", "32, 32)      yes"],
        ["1", "layer1", "(64,", "32, 32)      yes"],
        ["2", "layer2", "(128,", "16, 16)     yes"],
        ["3", "layer3", "(256,", "8, 8)       yes"],
        ["4", "pool", "(256,)", "yes"],
        ["5", "fc", "(100,)"],
    ]


def test_runner_layers_takes_the_data_sets_image_shape() -> None:
    result = run_runner("layers", "resnet20", "--dataset", "digits")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[1]: line for line in result.stdout.splitlines()[2:]}
    assert len(rows) == 12
    assert "(32, 4, 4)" in rows["layer2.0"] and not rows["layer2.0"].endswith("yes")
    assert rows["fc"].split()[2:] == ["(10,)"]


def test_runner_layers_refuses_an_unknown_architecture_in_one_line() -> None:
    result = run_runner("layers", "resnet7")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown architecture 'resnet7'; allowed: " + ", ".join(sorted(CATALOGUE.architectures))
    ]


# --- run time -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_at_trains_on_digits_with_taps_by_index(tiny_in_process, restore_torch_threads, tmp_path: Path) -> None:
    log = train_student_on_digits(tiny_in_process, tmp_path, "at", {"teacher_taps": [3, 6, 9], "student_taps": [1, 2, 3]}, epochs=2)
    terms = [entry["terms"] for entry in log["epochs"]]
    assert all(set(entry) == {"at", "ce"} and all(math.isfinite(value) for value in entry.values()) for entry in terms)
