"""The learning-rate schedules: the CRD recipe's step milestones, their scaling to other epoch counts,
explicit milestones and gamma, the sweep checks that refuse milestones a run cannot reach, onecycle
against torch's own OneCycleLR, and the per-step linear warm-up."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from pipeline.catalogue import REPO_ROOT, load_catalogue
from pipeline.plan import build_plan
from pipeline.sweep import SweepError, check_sweep
from pipeline.sweep_schema import SECTIONS
from stages.training import TrainingSettings, learning_rate


def settings(**changes: Any) -> TrainingSettings:
    """The built-in teacher section, with ``changes``, as a stage would read it."""
    section = {key: field.default for key, field in SECTIONS["teacher"].items()}
    section.update(changes)
    return TrainingSettings.from_settings(section, seed=0)


def test_built_in_default_is_the_step_schedule_of_the_crd_recipe() -> None:
    default = settings()
    assert (default.epochs, default.lr, default.lr_schedule, default.milestones, default.gamma) == (240, 0.05, "step", None, 0.1)
    assert default.step_milestones == (150, 180, 210)


def test_240_epochs_drop_the_lr_exactly_where_repdistiller_does() -> None:
    # RepDistiller's adjust_learning_rate runs before 1-based epoch e = 1..240 and sets
    # lr = 0.05 x 0.1^(number of decay epochs 150, 180, 210 that e exceeds); our epoch k is its e = k + 1.
    schedule = settings()
    for epoch in range(1, 241):
        steps = sum(epoch > decay_epoch for decay_epoch in (150, 180, 210))
        assert learning_rate(schedule, epoch - 1) == pytest.approx(0.05 * 0.1**steps, rel=1e-12), epoch
    pinned = {0: 0.05, 149: 0.05, 150: 0.005, 179: 0.005, 180: 0.0005, 209: 0.0005, 210: 0.00005, 239: 0.00005}
    assert {epoch: learning_rate(schedule, epoch) for epoch in pinned} == pytest.approx(pinned, rel=1e-12)
    # The schedule it replaces dropped at 50% and 75%: epoch 120 was already at 0.005.
    assert learning_rate(schedule, 120) == 0.05


@pytest.mark.parametrize(("epochs", "milestones"), [
    (240, (150, 180, 210)),
    (30, (19, 23, 26)),  # 18.75, 22.5, 26.25: to the nearest epoch, the half up
    (16, (10, 12, 14)),  # exact
    (8, (5, 6, 7)),
    (2, (1, 2, 2)),  # 1.25, 1.5, 1.75: below 7 epochs drops coincide
    (1, (1, 1, 1)),  # a one-epoch run never drops
])
def test_recipe_milestones_scale_to_the_epochs_rounding_halves_up(epochs: int, milestones: tuple[int, ...]) -> None:
    assert settings(epochs=epochs).step_milestones == milestones


def test_30_epochs_train_19_epochs_at_the_full_rate() -> None:
    schedule = settings(epochs=30, lr=0.1)
    rates = [learning_rate(schedule, epoch) for epoch in range(30)]
    assert rates == pytest.approx([0.1] * 19 + [0.01] * 4 + [0.001] * 3 + [0.0001] * 4, rel=1e-12)


def test_explicit_milestones_and_gamma_are_used_as_given() -> None:
    schedule = settings(epochs=6, lr=1.0, milestones=[2, 4], gamma=0.5)
    assert schedule.step_milestones == (2, 4)
    assert [learning_rate(schedule, epoch) for epoch in range(6)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    assert learning_rate(settings(epochs=6, lr=1.0, milestones=[2, 4], lr_schedule="constant"), 5) == 1.0


@pytest.mark.parametrize(("epochs", "steps_per_epoch", "pct_start"), [(3, 7, 0.3), (2, 19, 0.25), (4, 5, 0.5), (1, 10, 0.9)])
def test_onecycle_is_torchs_one_cycle_lr_step_by_step(epochs: int, steps_per_epoch: int, pct_start: float) -> None:
    schedule = settings(lr_schedule="onecycle", epochs=epochs, lr=0.2, pct_start=pct_start)
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=0.2, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=0.2, total_steps=epochs * steps_per_epoch, pct_start=pct_start
    )
    torchs, ours = [], []
    for epoch in range(epochs):
        for step in range(steps_per_epoch):
            torchs.append(optimizer.param_groups[0]["lr"])
            ours.append(learning_rate(schedule, epoch, step, steps_per_epoch))
            optimizer.step()
            scheduler.step()
    assert ours == torchs
    # The peak is max_lr only where pct_start x total steps is a whole number of steps.
    assert ours[0] == pytest.approx(0.2 / 25) and 0.19 < max(ours) <= 0.2
    assert ours[-1] == pytest.approx(0.2 / 25 / 1e4)


def test_onecycle_whose_warm_phase_is_one_step_starts_at_max_lr() -> None:
    # pct_start x total steps = 1: torch's OneCycleLR divides by zero at its first step.
    schedule = settings(lr_schedule="onecycle", epochs=2, lr=1.0, pct_start=0.25)
    assert learning_rate(schedule, 0, 0, 2) == 1.0
    assert learning_rate(schedule, 1, 1, 2) == pytest.approx(1 / 25 / 1e4)


def test_warm_up_ramps_cosine_linearly_per_step_then_follows_it_per_epoch() -> None:
    schedule = settings(lr_schedule="cosine", epochs=4, lr=1.0, warmup_epochs=1)
    rates = [learning_rate(schedule, epoch, step, 4) for epoch in range(4) for step in range(4)]
    cosine = [0.5 * (1 + math.cos(math.pi * epoch / 4)) for epoch in range(4)]
    assert rates == pytest.approx([0.25, 0.5, 0.75, 1.0] + [cosine[1]] * 4 + [cosine[2]] * 4 + [cosine[3]] * 4, rel=1e-12)


def test_warm_up_multiplies_the_step_schedule_across_its_drops() -> None:
    schedule = settings(lr_schedule="step", epochs=3, lr=1.0, milestones=[1], gamma=0.1, warmup_epochs=2)
    rates = [learning_rate(schedule, epoch, step, 2) for epoch in range(3) for step in range(2)]
    assert rates == pytest.approx([0.25, 0.5, 0.075, 0.1, 0.1, 0.1], rel=1e-12)


def test_without_warm_up_the_per_epoch_schedules_ignore_the_step() -> None:
    for schedule in ("cosine", "step", "constant"):
        per_epoch = settings(lr_schedule=schedule, epochs=10)
        for epoch in range(10):
            assert {learning_rate(per_epoch, epoch, step, 9) for step in range(9)} == {learning_rate(per_epoch, epoch)}


# --- the sweep file -----------------------------------------------------------------------------------

def sweep(**sections: Any) -> dict[str, Any]:
    document: dict[str, Any] = {"name": "schedule", "axes": {"dataset": ["digits"], "pair": ["resnet20:resnet8x0.25"],
                                                             "method": ["vanilla"]}}
    axes = sections.pop("axes", {})
    document["axes"].update(axes)
    document["defaults"] = sections
    return document


def test_sweep_takes_null_and_valid_milestones_for_teacher_and_student() -> None:
    checked = check_sweep(sweep(teacher={"epochs": 30, "milestones": [10, 20, 30], "gamma": 0.2},
                                student={"epochs": 30}), "sweep.yaml", load_catalogue())
    assert checked.defaults["teacher"]["milestones"] == [10, 20, 30]
    assert checked.defaults["teacher"]["gamma"] == 0.2
    assert checked.defaults["student"]["milestones"] is None and checked.defaults["student"]["gamma"] == 0.1


@pytest.mark.parametrize(("document", "message"), [
    (sweep(teacher={"epochs": 30, "milestones": [150, 180, 210]}),
     "sweep.yaml: defaults.teacher.milestones[0]: 150 is beyond the 30 epochs; "
     "allowed: increasing epochs in 1..30 (teacher.epochs), null (the recipe's, scaled)"),
    (sweep(student={"milestones": [150, 150, 210]}),
     "sweep.yaml: defaults.student.milestones[1]: 150 does not increase on 150; "
     "allowed: increasing epochs in 1..240 (student.epochs), null (the recipe's, scaled)"),
    (sweep(student={"milestones": [20, 10]}), "sweep.yaml: defaults.student.milestones[1]: 10 does not increase on 20;"),
    (sweep(teacher={"milestones": [0, 10]}), "sweep.yaml: defaults.teacher.milestones: 0 is below the minimum 1"),
    (sweep(teacher={"milestones": [1.5]}), "sweep.yaml: defaults.teacher.milestones: must be an int, got float 1.5"),
    (sweep(teacher={"milestones": 150}), "sweep.yaml: defaults.teacher.milestones: must be a list, got int 150"),
    (sweep(teacher={"gamma": 2}), "sweep.yaml: defaults.teacher.gamma: 2.0 is above the maximum 1.0"),
    # Every epochs value of an axis is checked against the milestones it is planned with.
    (sweep(teacher={"milestones": [20, 40]}, axes={"teacher.epochs": [60, 30]}),
     "sweep.yaml: defaults.teacher.milestones[1]: 40 is beyond the 30 epochs;"),
    (sweep(axes={"student.milestones": [None, [5, 300]]}),
     "sweep.yaml: axes.student.milestones[1][1]: 300 is beyond the 240 epochs;"),
])
def test_sweep_refuses_milestones_with_one_line_naming_file_key_and_allowed_values(document: dict[str, Any], message: str) -> None:
    with pytest.raises(SweepError) as error:
        check_sweep(document, "sweep.yaml", load_catalogue())
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_milestones_and_gamma_are_in_the_training_stage_hashes(tmp_path: Path) -> None:
    def teacher_hash(teacher: dict[str, Any]) -> str:
        path = tmp_path / f"sweep{len(list(tmp_path.iterdir()))}.yaml"
        path.write_text(yaml.safe_dump(sweep(teacher={"epochs": 30, **teacher})))
        [stage] = [stage for stage in build_plan(path, REPO_ROOT).stages.values() if stage.kind == "train_teacher"]
        return stage.hash

    hashes = {teacher_hash({}), teacher_hash({"milestones": [10, 20]}), teacher_hash({"gamma": 0.5})}
    assert len(hashes) == 3
