"""The optimisers (sgd, adamw, lion) built from a training section, one step of each against torch or the
published update, the sweep checks that refuse settings torch would refuse or ignore, the Lion lr warning,
and a teacher run with adamw, warm-up and onecycle that resumes exactly after an interruption."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lion_pytorch import Lion

from pipeline.catalogue import REPO_ROOT, load_catalogue
from pipeline.logfiles import read_log
from pipeline.plan import build_plan
from pipeline.store import StageFolders
from pipeline.sweep import SweepError, check_sweep
from pipeline.sweep_schema import SECTIONS
from stages import run_stage
from stages.files import load_torch
from stages.training import EpochLoop, TrainingSettings, build_optimizer
from tests.conftest import stage_name, write_sweep

pytestmark = pytest.mark.usefixtures("restore_torch_threads")


def settings(**changes: Any) -> TrainingSettings:
    """The built-in student section, with ``changes``, as a stage would read it."""
    section = {key: field.default for key, field in SECTIONS["student"].items()}
    section.update(changes)
    return TrainingSettings.from_settings(section, seed=0)


def weights() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5])), torch.nn.Parameter(torch.tensor([[0.3, 0.0], [-1.0, 4.0]]))]


def one_step(optimizer: torch.optim.Optimizer, parameters: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """The parameters after one step on the loss sum(w^3), whose gradient 3 w^2 is >= 0 everywhere."""
    optimizer.zero_grad()
    sum((parameter**3).sum() for parameter in parameters).backward()
    optimizer.step()
    return [parameter.detach().clone() for parameter in parameters]


# --- building ----------------------------------------------------------------------------------------

def test_the_default_is_the_crd_recipes_sgd() -> None:
    optimizer = build_optimizer(weights(), settings())
    assert type(optimizer) is torch.optim.SGD
    assert {key: optimizer.defaults[key] for key in ("lr", "momentum", "nesterov", "weight_decay")} == {
        "lr": 0.05, "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4}


def test_sgd_takes_nesterov() -> None:
    optimizer = build_optimizer(weights(), settings(nesterov=True, momentum=0.8, weight_decay=1e-4, lr=0.1))
    assert (optimizer.defaults["nesterov"], optimizer.defaults["momentum"], optimizer.defaults["weight_decay"]) == (True, 0.8, 1e-4)


@pytest.mark.parametrize(("name", "kind", "own_betas"), [("adamw", torch.optim.AdamW, (0.9, 0.999)), ("lion", Lion, (0.9, 0.99))])
def test_adamw_and_lion_build_with_their_own_betas_unless_given(name: str, kind: type, own_betas: tuple[float, float]) -> None:
    optimizer = build_optimizer(weights(), settings(optimizer=name, lr=1e-3, weight_decay=0.01))
    assert type(optimizer) is kind
    assert (optimizer.defaults["lr"], optimizer.defaults["betas"], optimizer.defaults["weight_decay"]) == (1e-3, own_betas, 0.01)
    given = build_optimizer(weights(), settings(optimizer=name, betas=[0.8, 0.95]))
    assert given.defaults["betas"] == (0.8, 0.95)


# --- one step ----------------------------------------------------------------------------------------

def test_one_adamw_step_is_torchs_adamw_step_with_decoupled_decay() -> None:
    ours, theirs = weights(), weights()
    after = one_step(build_optimizer(ours, settings(optimizer="adamw", lr=0.01, weight_decay=0.1, betas=[0.8, 0.9])), ours)
    reference = one_step(torch.optim.AdamW(theirs, lr=0.01, betas=(0.8, 0.9), weight_decay=0.1), theirs)
    for mine, torchs, start in zip(after, reference, weights()):
        assert torch.equal(mine, torchs)
        # Adam's first step is lr x g / (|g| + eps) after bias correction: lr where the gradient is not 0.
        gradient = 3 * start**2
        expected = start * (1 - 0.01 * 0.1) - 0.01 * gradient / (gradient.abs() + 1e-8)
        assert torch.allclose(mine, expected, atol=1e-7)


def test_one_lion_step_moves_each_weight_by_lr_times_the_gradients_sign() -> None:
    ours, theirs = weights(), weights()
    after = one_step(build_optimizer(ours, settings(optimizer="lion", lr=1e-3, weight_decay=0.5)), ours)
    reference = one_step(Lion(theirs, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.5), theirs)
    for mine, lions, start in zip(after, reference, weights()):
        assert torch.equal(mine, lions)
        assert torch.allclose(mine, start * (1 - 1e-3 * 0.5) - 1e-3 * torch.sign(3 * start**2), atol=1e-7)


# --- the sweep file ----------------------------------------------------------------------------------

def sweep(**sections: Any) -> dict[str, Any]:
    document: dict[str, Any] = {"name": "optimisers", "axes": {"dataset": ["digits"], "pair": ["resnet20:resnet8x0.25"],
                                                               "method": ["vanilla"]}}
    document["axes"].update(sections.pop("axes", {}))
    document["defaults"] = sections
    return document


def test_sweep_defaults_are_sgd_without_nesterov_warm_up_or_betas() -> None:
    checked = check_sweep(sweep(), "sweep.yaml", load_catalogue())
    for section in ("teacher", "student"):
        defaults = checked.defaults[section]
        assert (defaults["optimizer"], defaults["nesterov"], defaults["betas"], defaults["warmup_epochs"], defaults["pct_start"]) == (
            "sgd", False, None, 0, 0.3)


def test_sweep_takes_adamw_with_betas_warm_up_and_onecycle() -> None:
    checked = check_sweep(sweep(student={"optimizer": "adamw", "lr": 1e-3, "betas": [0.9, 0.95], "warmup_epochs": 5,
                                         "lr_schedule": "onecycle", "pct_start": 0.25}), "sweep.yaml", load_catalogue())
    student = checked.defaults["student"]
    assert (student["optimizer"], student["betas"], student["warmup_epochs"], student["lr_schedule"], student["pct_start"]) == (
        "adamw", [0.9, 0.95], 5, "onecycle", 0.25)


@pytest.mark.parametrize(("document", "message"), [
    (sweep(teacher={"optimizer": "adam"}), "sweep.yaml: defaults.teacher.optimizer: 'adam' is not allowed; allowed: sgd, adamw, lion"),
    (sweep(teacher={"lr_schedule": "one_cycle"}),
     "sweep.yaml: defaults.teacher.lr_schedule: 'one_cycle' is not allowed; allowed: cosine, step, constant, onecycle"),
    (sweep(teacher={"optimizer": "adamw", "nesterov": True}),
     "sweep.yaml: defaults.teacher.nesterov: nesterov is for optimizer sgd, not adamw (defaults.teacher.optimizer); "
     "allowed: false, true with sgd"),
    (sweep(student={"optimizer": "lion", "lr": 1e-4}, axes={"student.nesterov": [False, True]}),
     "sweep.yaml: axes.student.nesterov[1]: nesterov is for optimizer sgd, not lion (defaults.student.optimizer);"),
    (sweep(student={"nesterov": True, "momentum": 0}),
     "sweep.yaml: defaults.student.nesterov: nesterov needs momentum above 0 (defaults.student.momentum is 0); "
     "allowed: false, true with momentum > 0"),
    (sweep(teacher={"optimizer": "adamw", "betas": [0.9]}), "sweep.yaml: defaults.teacher.betas: must be a list of 2 items, got 1"),
    (sweep(teacher={"optimizer": "adamw", "betas": 0.9}), "sweep.yaml: defaults.teacher.betas: must be a list, got float 0.9"),
    (sweep(teacher={"optimizer": "adamw", "betas": ["a", 0.9]}), "sweep.yaml: defaults.teacher.betas: must be a number, got str 'a'"),
    (sweep(teacher={"optimizer": "adamw", "betas": [-0.1, 0.9]}), "sweep.yaml: defaults.teacher.betas: -0.1 is below the minimum 0.0"),
    (sweep(teacher={"optimizer": "lion", "lr": 1e-4, "betas": [0.9, 1]}),
     "sweep.yaml: defaults.teacher.betas[1]: 1.0 is not below 1; allowed: two numbers in [0, 1), null"),
    (sweep(student={"betas": [0.9, 0.99]}),
     "sweep.yaml: defaults.student.betas: betas are for adamw and lion, not sgd (defaults.student.optimizer); allowed: null"),
    (sweep(teacher={"epochs": 30, "warmup_epochs": 31}),
     "sweep.yaml: defaults.teacher.warmup_epochs: 31 is beyond the 30 epochs (defaults.teacher.epochs); allowed: 0..30"),
    (sweep(teacher={"warmup_epochs": 5}, axes={"teacher.epochs": [10, 2]}),
     "sweep.yaml: defaults.teacher.warmup_epochs: 5 is beyond the 2 epochs (axes.teacher.epochs[1]); allowed: 0..2"),
    (sweep(teacher={"warmup_epochs": -1}), "sweep.yaml: defaults.teacher.warmup_epochs: -1 is below the minimum 0"),
    (sweep(student={"pct_start": 0}),
     "sweep.yaml: defaults.student.pct_start: 0.0 is not strictly between 0 and 1; allowed: numbers in (0, 1)"),
    (sweep(axes={"student.pct_start": [0.3, 1]}), "sweep.yaml: axes.student.pct_start[1]: 1.0 is not strictly between 0 and 1;"),
])
def test_sweep_refuses_optimiser_settings_with_one_line_naming_file_key_and_allowed_values(
    document: dict[str, Any], message: str
) -> None:
    with pytest.raises(SweepError) as error:
        check_sweep(document, "sweep.yaml", load_catalogue())
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_lion_with_an_sgd_sized_lr_warns_once_on_stderr_and_still_plans(capsys: pytest.CaptureFixture[str]) -> None:
    checked = check_sweep(sweep(teacher={"optimizer": "lion", "lr": 0.05}, student={"optimizer": "lion", "lr": 3e-4},
                                axes={"seed": [0, 1]}), "sweep.yaml", load_catalogue())
    assert checked.defaults["teacher"]["optimizer"] == "lion"
    assert capsys.readouterr().err == (
        "sweep.yaml: defaults.teacher.lr: warning: lr 0.05 is high for optimizer lion, which wants a 3-10x smaller lr than adamw\n"
    )
    check_sweep(sweep(teacher={"optimizer": "adamw", "lr": 0.05}, student={"optimizer": "lion", "lr": 1e-2}),
                "sweep.yaml", load_catalogue())
    assert capsys.readouterr().err == ""


def test_optimiser_keys_are_in_the_training_stage_hashes(tmp_path: Path) -> None:
    def teacher_hash(teacher: dict[str, Any]) -> str:
        path = tmp_path / f"sweep{len(list(tmp_path.iterdir()))}.yaml"
        path.write_text(yaml.safe_dump(sweep(teacher={"epochs": 30, **teacher})))
        [stage] = [stage for stage in build_plan(path, REPO_ROOT).stages.values() if stage.kind == "train_teacher"]
        return stage.hash

    changes = [{}, {"optimizer": "adamw"}, {"nesterov": True}, {"optimizer": "adamw", "betas": [0.9, 0.95]},
               {"warmup_epochs": 1}, {"lr_schedule": "onecycle"}, {"lr_schedule": "onecycle", "pct_start": 0.5}]
    assert len({teacher_hash(change) for change in changes}) == len(changes)


# --- resuming ----------------------------------------------------------------------------------------

class Interrupted(Exception):
    """Stands for the job being killed between two epochs."""


def test_adamw_warm_up_onecycle_teacher_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sweep_file = write_sweep(tmp_path / "tiny.yaml", {
        "defaults.teacher.optimizer": "adamw", "defaults.teacher.lr": 3e-3, "defaults.teacher.weight_decay": 0.05,
        "defaults.teacher.warmup_epochs": 1, "defaults.teacher.lr_schedule": "onecycle",
    })
    plan = build_plan(sweep_file)
    name = stage_name(plan, "teacher_stage")
    spec = plan.stages[name]
    assert run_stage(spec, tmp_path / "whole") == "done"

    train_one_epoch = EpochLoop._train_one_epoch

    def stop_before_epoch_2(loop: EpochLoop, optimizer: torch.optim.Optimizer, epoch: int) -> dict[str, Any]:
        if epoch == 1:
            raise Interrupted
        return train_one_epoch(loop, optimizer, epoch)

    with monkeypatch.context() as patch:
        patch.setattr(EpochLoop, "_train_one_epoch", stop_before_epoch_2)
        with pytest.raises(Interrupted):
            run_stage(spec, tmp_path / "resumed")
    assert run_stage(spec, tmp_path / "resumed") == "done"

    whole, resumed = (StageFolders(tmp_path / root, name) for root in ("whole", "resumed"))
    whole_log, resumed_log = read_log(whole.logs), read_log(resumed.logs)
    assert resumed_log["resumed_after_epochs"] == [1] and whole_log["resumed_after_epochs"] == []

    def without_timing(log: dict[str, Any]) -> list[dict[str, Any]]:
        return [{key: value for key, value in entry.items() if key != "epoch_time_s"} for entry in log["epochs"]]

    assert without_timing(resumed_log) == without_timing(whole_log)
    # Warm-up over epoch 1 starts the onecycle's lr/25 at a 1/steps share of it.
    assert 0 < whole_log["epochs"][0]["lr"] < 3e-3 / 25 / 5
    whole_weights, resumed_weights = load_torch(whole.final_weights), load_torch(resumed.final_weights)
    for key, tensor in whole_weights["model"].items():
        assert torch.equal(tensor, resumed_weights["model"][key]), key
