"""Two sweeps sharing a teacher on the real Slurm cluster (issue 6, point 1): the second submit sends
no second teacher job, its students wait on the first sweep's teacher job, and the teacher is
trained once, by one job, with no resumption or takeover in its log."""
from __future__ import annotations

from pathlib import Path

from pipeline.logfiles import read_log
from pipeline.manifest import Manifest
from pipeline.plan import build_plan
from pipeline.store import StageFolders
from tests.slurm.test_backend import runner, wait_until, write_sweep

TEACHER_EPOCHS = 6


def test_a_second_sweep_waits_on_the_first_sweeps_teacher_job(slurm_cluster, tmp_path: Path) -> None:
    defaults = {"teacher": {"epochs": TEACHER_EPOCHS, "lr_schedule": "cosine"}, "student": {"epochs": 1}}
    first = write_sweep(tmp_path, "share-first", {"pair": ["resnet20:resnet8x0.25"], "method": ["kd"], "seed": [0]}, defaults)
    second = write_sweep(tmp_path, "share-second", {"pair": ["resnet20:resnet8x0.25"], "method": ["kd"], "seed": [1]}, defaults)
    root = tmp_path / "out"
    teacher = next(name for name, spec in build_plan(first).stages.items() if spec.kind == "train_teacher")
    assert teacher in build_plan(second).stages

    submitted = runner("submit", str(first), "--backend", "slurm", "--root", str(root))
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    teacher_job = Manifest.load(root / "jobs" / "share-first").stages[teacher]["job_id"]

    again = runner("submit", str(second), "--backend", "slurm", "--wait", "--root", str(root))
    assert again.returncode == 0, again.stdout + again.stderr
    second_manifest = Manifest.load(root / "jobs" / "share-second").stages
    assert second_manifest[teacher].get("job_id") in (None, teacher_job)  # no job of its own for the teacher
    students = [name for name, entry in second_manifest.items() if entry.get("kind") == "train_student"]
    assert students and all(teacher_job in second_manifest[name].get("after", []) for name in students), second_manifest

    wait_until(lambda: all(StageFolders(root, name).is_done() for name in build_plan(first).stages), 600, "the first sweep")
    log = read_log(StageFolders(root, teacher).logs)
    assert [entry["epoch"] for entry in log["epochs"]] == list(range(1, TEACHER_EPOCHS + 1))
    assert log["resumed_after_epochs"] == [] and log["lease_takeover"] is None
    assert all(StageFolders(root, name).is_done() for name in build_plan(second).stages)
