"""The shipped presets plan, hold the pairs and layer lists we read from their papers' code, start from
weights that resolve, and pass preflight against the real tap shapes.

Preflight refuses a data set that reads files when no data_root is set, and planning with a data_root
would fingerprint files these tests do not have; so each planned stage's runtime data_root is pointed
at an empty folder after planning (preflight only checks that the key is set, the shapes come from the
data set declarations). torchvision weights files are written with random values under a temporary
TORCH_HOME, never downloaded.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.catalogue import load_catalogue
from pipeline.plan import Plan, build_plan

REPO = Path(__file__).resolve().parents[1]
FEATURE_ONLY = REPO / "configs" / "feature_only"

# file: (experiments, pair, {dataset: (teacher_taps, student_taps)})
FEATURE_ONLY_PRESETS = {
    "resnet34_resnet9.yaml": (18, "resnet34:resnet9", {
        ds: ([13, "layer3", 15, 16], ["layer1", "layer2", "layer3", "layer4"]) for ds in ("cifar10", "cifar100", "tinyimagenet")}),
    "vgg19_vgg11.yaml": (18, "vgg19_bn:vgg11_bn", {
        ds: (["layer3", 12, 13, "layer4"], ["layer1", "layer2", "layer3", "layer4"]) for ds in ("cifar10", "cifar100", "tinyimagenet")}),
    "resnet34_mobilenet_v2.yaml": (18, "resnet34:mobilenet_v2", {
        ds: ([13, "layer3", 15, 16], ["layer1", "layer2", "layer3", "layer4"]) for ds in ("cifar10", "cifar100", "tinyimagenet")}),
    "vit_b_16_vit_tiny_cifar10.yaml": (6, "vit_b_16:vit_tiny", {"cifar10": (["layer3", 10, 11, "layer4"], [1, 3, 5, 7])}),
    "vit_b_16_vit_tiny_cifar100.yaml": (6, "vit_b_16:vit_tiny", {"cifar100": ([7, 10, 11, "layer4"], [1, 3, 5, 7])}),
    "vit_b_16_vit_tiny_tinyimagenet.yaml": (6, "vit_b_16:vit_tiny", {"tinyimagenet": ([7, 8, 11, "layer4"], [1, 3, 5, 7])}),
}
CONKD = REPO / "configs" / "conkd_imagenette.yaml"


def _students(plan: Plan, method: str) -> list:
    return [spec for spec in plan.stages.values() if spec.kind == "train_student" and spec.settings["method"]["name"] == method]


def _with_data_root(plan: Plan, folder: Path) -> Plan:
    """The plan with a data_root set, and without its prepare_data stages, whose check would scan
    the data folder: these tests check method and init settings against shapes, not data files."""
    for spec in plan.stages.values():
        spec.runtime["data_root"] = str(folder)
    stages = {name: spec for name, spec in plan.stages.items() if spec.kind != "prepare_data"}
    return replace(plan, stages=stages)


@pytest.mark.parametrize("name", sorted(FEATURE_ONLY_PRESETS))
def test_feature_only_preset_plans_with_its_pair_and_layers(name):
    experiments, pair, layers = FEATURE_ONLY_PRESETS[name]
    plan = build_plan(FEATURE_ONLY / name)
    assert len(plan.experiments) == experiments
    assert {f"{e.teacher}:{e.student}" for e in plan.experiments} == {pair}
    assert {e.dataset for e in plan.experiments} == set(layers)
    students = _students(plan, "feature_only")
    assert len(students) == experiments // 2
    for spec in students:
        params = spec.settings["method"]["params"]
        teacher_taps, student_taps = layers[spec.settings["dataset"]["name"]]
        assert (params["teacher_taps"], params["student_taps"]) == (teacher_taps, student_taps)
        assert params["detach_head"] is True and params["projection"] == "conv1x1"
    teachers = [spec for spec in plan.stages.values() if spec.kind == "train_teacher"]
    assert teachers and all(spec.settings["training"]["init"] == {"torchvision": "IMAGENET1K_V1"} for spec in teachers)
    assert all(spec.settings["training"]["backbone_lr_scale"] == 0.01 for spec in teachers)


def test_conkd_preset_plans_kd_supcon_on_lion():
    plan = build_plan(CONKD)
    assert len(plan.experiments) == 6
    assert {(e.teacher, e.student, e.dataset) for e in plan.experiments} == {("resnet101", "resnet18", "imagenette")}
    (teacher,) = [spec for spec in plan.stages.values() if spec.kind == "train_teacher"]
    assert teacher.settings["training"]["init"] == {"torchvision": "IMAGENET1K_V1"}
    students = _students(plan, "kd+supcon")
    assert len(students) == 3
    for spec in students:
        assert spec.settings["training"]["optimizer"] == "lion"
        kd, supcon = (part["params"] for part in spec.settings["method"]["parts"])
        assert kd["logit_standardization"] is True and kd["temperature"] == 2.0 and kd["kd_weight"] == 1.0
        assert supcon["alpha"] == 0.15 and "ce_weight" not in supcon


def test_feature_only_method_settings_pass_preflight_against_real_shapes(tmp_path):
    """The layer lists fit the tap shapes of every pair and data set; init is left out here (the slow
    test below checks it with weights files)."""
    from stages.preflight import check_plan

    catalogue = load_catalogue()
    for name in FEATURE_ONLY_PRESETS:
        plan = _with_data_root(build_plan(FEATURE_ONLY / name), tmp_path)
        for spec in plan.stages.values():
            spec.settings.get("training", {}).pop("init", None)
        check_plan(plan, catalogue)


def test_preflight_refuses_a_misfitting_layer_list(tmp_path):
    """The check above can fail: a pooled (D,) teacher tap in place of a map is refused."""
    from pipeline.sweep import SweepError
    from stages.preflight import check_plan

    plan = _with_data_root(build_plan(FEATURE_ONLY / "vgg19_vgg11.yaml"), tmp_path)
    for spec in plan.stages.values():
        spec.settings.get("training", {}).pop("init", None)
        if spec.kind == "train_student" and spec.settings["method"]["name"] == "feature_only":
            spec.settings["method"]["params"]["teacher_taps"][-1] = 16  # vgg19_bn's pool, (512,)
    with pytest.raises(SweepError, match="methods.feature_only"):
        check_plan(plan, load_catalogue())


def _write_torchvision_weights(home: Path, arch: str) -> None:
    import torch
    import torchvision

    weights = torchvision.models.get_model_weights(arch)["IMAGENET1K_V1"]
    folder = home / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.get_model(arch, weights=None).state_dict(), folder / Path(weights.url).name)


@pytest.mark.slow
def test_presets_pass_preflight_with_their_torchvision_weights(tmp_path, monkeypatch):
    """Every preset's teacher init resolves to a torchvision file that fits its architecture
    (random-valued files: resnet101 and vit_b_16 make this ~0.5 GB and tens of seconds)."""
    from stages.preflight import check_plan

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for arch in ("resnet34", "vgg19_bn", "vit_b_16", "resnet101"):
        _write_torchvision_weights(tmp_path / "torch", arch)
    catalogue = load_catalogue()
    for path in [*(FEATURE_ONLY / name for name in FEATURE_ONLY_PRESETS), CONKD]:
        check_plan(_with_data_root(build_plan(path), tmp_path / "data"), catalogue)
