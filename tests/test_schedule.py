"""The step learning-rate schedule: the CRD recipe's milestones, their scaling to other epoch counts,
explicit milestones and gamma, and the sweep checks that refuse milestones a run cannot reach."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
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
