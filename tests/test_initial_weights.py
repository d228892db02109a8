"""Imported starting weights (``init``): planned by content, refused before anything is queued when
they are missing or do not fit, loaded as they are (epochs 0) or fine-tuned with a scaled backbone lr."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torchvision

from data.registry import load_dataset
from models.pretrained import fit_initial_state
from models.registry import build_model
from pipeline.catalogue import load_catalogue
from pipeline.plan import build_plan
from pipeline.store import StageFolders, read_json
from pipeline.sweep import SweepError
from stages import run_stage
from stages.files import load_torch
from stages.preflight import check_plan
from stages.training import accuracy, backbone_lr_scales, parameter_groups, predict
from tests.conftest import stage_name, write_sweep

DIGITS = (1, 8, 8)


def repdistiller_checkpoint(path: Path, model: torch.nn.Module) -> Path:
    """``model``'s weights saved as RepDistiller saves a teacher: ``{"model": state, "epoch": ...}``
    with its resnet.py key names (conv1/bn1 for the stem, downsample for the shortcut)."""
    names = {"stem.0.": "conv1.", "stem.1.": "bn1."}
    state = {}
    for key, value in model.state_dict().items():
        for ours, theirs in names.items():
            key = theirs + key.removeprefix(ours) if key.startswith(ours) else key
        state[key.replace(".shortcut.", ".downsample.")] = value.clone()
    torch.save({"model": state, "epoch": 240, "accuracy": 0.0}, path)
    return path


def torchvision_weights(torch_home: Path, arch: str = "resnet18") -> Path:
    """A torchvision-format weights file (random values, 1,000 classes) where torch hub keeps it."""
    weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    path = torch_home / "hub" / "checkpoints" / Path(weights.url).name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.get_model(arch, weights=None).state_dict(), path)
    return path


def teacher_sweep(tmp_path: Path, init: object, epochs: int = 0, **teacher: object) -> Path:
    return write_sweep(tmp_path / "sweep.yaml", {
        "axes.method": ["kd"], "defaults.teacher.init": init, "defaults.teacher.epochs": epochs,
        **{f"defaults.teacher.{key}": value for key, value in teacher.items()},
    })


def test_the_teacher_hash_covers_the_checkpoints_content_not_its_path(tmp_path: Path) -> None:
    torch.manual_seed(0)
    first = repdistiller_checkpoint(tmp_path / "a.pth", build_model("resnet20", 10, DIGITS))
    moved = tmp_path / "elsewhere" / "b.pth"
    moved.parent.mkdir()
    shutil.copy(first, moved)
    teacher = lambda sweep: stage_name(build_plan(sweep), "teacher_stage")  # noqa: E731
    at_first = teacher(teacher_sweep(tmp_path / "one", {"checkpoint": str(first)}))
    assert teacher(teacher_sweep(tmp_path / "two", {"checkpoint": str(moved)})) == at_first
    scratch = teacher(write_sweep(tmp_path / "scratch.yaml", {"axes.method": ["kd"]}))
    assert scratch != at_first
    repdistiller_checkpoint(moved, build_model("resnet20", 10, DIGITS))
    assert teacher(teacher_sweep(tmp_path / "three", {"checkpoint": str(moved)})) != at_first


def test_a_relative_checkpoint_is_relative_to_the_sweep_file(tmp_path: Path) -> None:
    repdistiller_checkpoint(tmp_path / "teacher.pth", build_model("resnet20", 10, DIGITS))
    plan = build_plan(teacher_sweep(tmp_path / "sweeps", {"checkpoint": "../teacher.pth"}))
    init = plan.stages[stage_name(plan, "teacher_stage")].settings["training"]["init"]
    assert init["checkpoint"] == str(tmp_path / "teacher.pth")


def test_zero_epochs_ignores_the_training_settings_in_the_hash(tmp_path: Path) -> None:
    checkpoint = repdistiller_checkpoint(tmp_path / "t.pth", build_model("resnet20", 10, DIGITS))
    teacher = lambda sweep: stage_name(build_plan(sweep), "teacher_stage")  # noqa: E731
    assert teacher(teacher_sweep(tmp_path / "a", {"checkpoint": str(checkpoint)}, lr=0.1)) == \
        teacher(teacher_sweep(tmp_path / "b", {"checkpoint": str(checkpoint)}, lr=0.2))


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"defaults.teacher.init": {"url": "http://x"}},
     "defaults.teacher.init: {'url': 'http://x'} has unknown keys ['url']; allowed: scratch, {torchvision: WEIGHTS_NAME}"),
    ({"defaults.teacher.init": {"checkpoint": "missing.pth"}}, "teacher.init: cannot read the checkpoint: [Errno 2]"),
    ({"defaults.teacher.epochs": 0}, "defaults.teacher.epochs: epochs 0 uses the imported weights as they are, but "
                                     "defaults.teacher.init is scratch"),
    ({"defaults.student.epochs": 0}, "defaults.student.epochs: a student trains at least one epoch"),
    ({"axes.pair": ["vit_b_16:resnet8x0.25"]},
     "axes.pair[0]: teacher vit_b_16 needs images of at least 32x32 px, but data set digits has 8x8"),
])
def test_bad_init_settings_are_refused_at_plan_time_in_one_line(tmp_path: Path, changes: dict, fragment: str) -> None:
    with pytest.raises(SweepError) as raised:
        build_plan(write_sweep(tmp_path / "sweep.yaml", {"axes.method": ["kd"], **changes}))
    message = str(raised.value)
    assert fragment in message and "\n" not in message


def preflight(sweep: Path) -> None:
    check_plan(build_plan(sweep), load_catalogue())


def test_preflight_names_the_first_missing_and_unexpected_keys(tmp_path: Path) -> None:
    torch.save({"model": {"features.0.weight": torch.zeros(3)}}, tmp_path / "other.pth")
    with pytest.raises(SweepError, match=r"teacher.init: checkpoint .*other.pth does not fit resnet20: "
                                         r"missing keys stem.0.weight, stem.1.weight, stem.1.bias and \d+ more; "
                                         r"unexpected keys features.0.weight"):
        preflight(teacher_sweep(tmp_path, {"checkpoint": str(tmp_path / "other.pth")}))


def test_preflight_refuses_another_architectures_checkpoint(tmp_path: Path) -> None:
    repdistiller_checkpoint(tmp_path / "wide.pth", build_model("resnet8x4", 10, DIGITS))
    with pytest.raises(SweepError, match=r"does not fit resnet20: missing keys"):
        preflight(teacher_sweep(tmp_path, {"checkpoint": str(tmp_path / "wide.pth")}))


def test_preflight_names_the_torchvision_file_to_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    sweep = write_sweep(tmp_path / "sweep.yaml", {
        "axes.method": ["kd"], "axes.pair": ["resnet18:resnet8x0.25"],
        "defaults.teacher.init": {"torchvision": "IMAGENET1K_V1"},
    })
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(SweepError, match=rf"teacher.init: torchvision weights ResNet18_Weights.IMAGENET1K_V1 are not on "
                                         rf"this machine: place resnet18-f37072fd.pth .* at {expected}"):
        preflight(sweep)
    torchvision_weights(tmp_path / "torch")
    preflight(sweep)


def test_preflight_refuses_zero_epochs_when_the_head_does_not_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torchvision_weights(tmp_path / "torch")
    sweep = write_sweep(tmp_path / "sweep.yaml", {
        "axes.method": ["kd"], "axes.pair": ["resnet18:resnet8x0.25"],
        "defaults.teacher.init": {"torchvision": "DEFAULT"}, "defaults.teacher.epochs": 0,
    })
    with pytest.raises(SweepError, match=r"teacher.epochs: 0 uses the torchvision ResNet18_Weights.IMAGENET1K_V1 weights "
                                         r"as they are, but their classifier does not fit data set digits's 10 classes"):
        preflight(sweep)


def test_an_unknown_torchvision_weights_name_lists_the_real_ones(tmp_path: Path) -> None:
    model = build_model("resnet18", 10, (3, 32, 32))
    with pytest.raises(ValueError, match=r"'IMAGENET22K' is not one of torchvision's ResNet18_Weights; allowed: IMAGENET1K_V1"):
        fit_initial_state(model, "resnet18", {"torchvision": "IMAGENET22K"}, (3, 32, 32))


def test_a_zero_epoch_teacher_is_its_checkpoint_and_is_scored_as_such(tmp_path: Path) -> None:
    torch.manual_seed(3)
    source = build_model("resnet20", 10, DIGITS)
    checkpoint = repdistiller_checkpoint(tmp_path / "t.pth", source)
    plan = build_plan(teacher_sweep(tmp_path, {"checkpoint": str(checkpoint)}))
    teacher, evaluation = stage_name(plan, "teacher_stage"), stage_name(plan, "teacher_evaluate_stage")
    root = tmp_path / "out"
    for name in (teacher, evaluation):
        run_stage(plan.stages[name], root)
    saved = load_torch(StageFolders(root, teacher).final_weights)["model"]
    assert saved.keys() == source.state_dict().keys()
    assert all(torch.equal(saved[key], value) for key, value in source.state_dict().items())
    log = read_json(StageFolders(root, teacher).config)
    assert log["settings"]["training"]["init"]["sha256"]
    data = load_dataset("digits", None, val_fraction=0.1, split_seed=0)
    expected = accuracy(predict(source, data.split_images("test", 256), torch.device("cpu"), data.normalise), data.test_labels)
    assert read_json(StageFolders(root, evaluation).result)["top1_last"] == pytest.approx(expected)


def test_a_checkpoint_changed_after_planning_is_refused_by_the_stage(tmp_path: Path) -> None:
    checkpoint = repdistiller_checkpoint(tmp_path / "t.pth", build_model("resnet20", 10, DIGITS))
    plan = build_plan(teacher_sweep(tmp_path, {"checkpoint": str(checkpoint)}))
    repdistiller_checkpoint(checkpoint, build_model("resnet20", 10, DIGITS))
    with pytest.raises(Exception, match=r"changed since the sweep was planned"):
        run_stage(plan.stages[stage_name(plan, "teacher_stage")], tmp_path / "out")


def test_fine_tuning_torchvision_weights_trains_a_new_head_and_a_slower_backbone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = torch.load(torchvision_weights(tmp_path / "torch"), weights_only=True)
    sweep = write_sweep(tmp_path / "sweep.yaml", {
        "axes.method": ["kd"], "axes.pair": ["resnet18:resnet8x0.25"],
        "defaults.teacher.init": {"torchvision": "IMAGENET1K_V1"}, "defaults.teacher.epochs": 1,
        "defaults.teacher.backbone_lr_scale": 0.01, "defaults.teacher.batch_size": 256,
    })
    plan = build_plan(sweep)
    teacher = stage_name(plan, "teacher_stage")
    run_stage(plan.stages[teacher], tmp_path / "out")
    folders = StageFolders(tmp_path / "out", teacher)
    from pipeline.logfiles import read_log

    log = read_log(folders.logs)
    assert log["initial_weights"]["source"] == "torchvision ResNet18_Weights.IMAGENET1K_V1"
    assert log["initial_weights"]["new_head"] is True
    groups = load_torch(folders.checkpoint)["optimizer"]["param_groups"]
    assert sorted(group["lr_scale"] for group in groups) == [0.01, 1.0]
    trained = load_torch(folders.final_weights)["model"]
    # A block the small stem leaves as it is starts from the file and moves only a little.
    start = weights["layer3.0.conv1.weight"]
    assert trained["layer3.0.conv1.weight"].shape == start.shape
    assert 0 < (trained["layer3.0.conv1.weight"] - start).abs().max() < 0.05


def test_parameter_groups_give_each_parameter_its_longest_paths_scale() -> None:
    modules = torch.nn.ModuleDict({"model": build_model("resnet8x0.25", 10, DIGITS), "method": torch.nn.Linear(2, 2)})
    groups = {group["lr_scale"]: group["params"] for group in parameter_groups(modules, backbone_lr_scales("model", 0.1))}
    head = {id(parameter) for parameter in modules["model"].fc.parameters()}
    extra = {id(parameter) for parameter in modules["method"].parameters()}
    assert {id(parameter) for parameter in groups[1.0]} == head | extra
    assert len(groups[0.1]) == len(list(modules.parameters())) - len(head) - len(extra)
    assert backbone_lr_scales("model", 1.0) == {}
