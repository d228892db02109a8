"""Every folder repairable (issue 6, points 3, 4, 8): verified DONE, damaged stages rebuilt with their
dependants, --force and invalidate, advice that names a command which works, and file modes that a
shared filesystem's collaborators can read."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import runner
from pipeline.logfiles import read_log
from pipeline.store import StageFolders, write_atomic
from stages import run_stage
from tests.conftest import REPO, SweepRun, run_runner, stage_name


def copy_outputs(run: SweepRun, target: Path) -> Path:
    """The sweep's logs/ and weights/ copied as a user would (cp -a keeps the mtimes)."""
    for folder in ("logs", "weights"):
        shutil.copytree(run.root / folder, target / folder)
    return target


def mtimes(root: Path, name: str) -> dict[Path, int]:
    folders = StageFolders(root, name)
    return {path: path.stat().st_mtime_ns for folder in (folders.logs, folders.weights) if folder.is_dir()
            for path in folder.iterdir()}


def advised_command(message: str) -> list[str]:
    """The ``python runner.py ...`` command an error message advises, as argv for this interpreter."""
    match = re.search(r"python runner\.py (.+?)(?:;|$)", message.strip())
    assert match, f"no command advised in: {message}"
    return [sys.executable, str(REPO / "runner.py"), *shlex.split(match.group(1))]


# 3. Verified DONE and repair ---------------------------------------------------------------------------------

def test_a_deleted_teacher_weight_is_damaged_and_submit_rebuilds_it_and_its_dependants(
    tiny_submitted: SweepRun, tmp_path: Path
) -> None:
    root = copy_outputs(tiny_submitted, tmp_path / "out")
    plan = tiny_submitted.plan
    teacher = StageFolders(root, stage_name(plan, "teacher_stage"))
    kd_student = stage_name(plan, "student_stage", "kd")
    vanilla_student = stage_name(plan, "student_stage", "vanilla")
    assert all(StageFolders(root, name).is_done() for name in plan.stages)  # the copy is still DONE

    teacher.final_weights.unlink()
    assert not teacher.is_done() and f"{teacher.final_weights} is missing" in teacher.done_problem()
    status = run_runner("status", str(tiny_submitted.sweep), "--root", str(root))
    assert f"damaged: {teacher.final_weights} is missing" in status.stdout, status.stdout
    vanilla_before = mtimes(root, vanilla_student)
    epochs_before = read_log(teacher.logs)["epochs"]

    result = run_runner("submit", str(tiny_submitted.sweep), "--root", str(root))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"rebuilding {teacher.name}: damaged: {teacher.final_weights} is missing" in result.stdout
    assert f"rebuilding {kd_student}: upstream {teacher.name} runs again" in result.stdout
    assert all(StageFolders(root, name).is_done() for name in plan.stages)
    repaired = read_log(teacher.logs)
    assert repaired["epochs"] == epochs_before  # rebuilt from its checkpoint: no epoch trained again
    assert repaired["repaired"] == f"{teacher.final_weights} is missing"
    student_log = read_log(StageFolders(root, kd_student).logs)
    assert student_log["resumed_after_epochs"] == []  # built afresh from the rebuilt teacher
    assert mtimes(root, vanilla_student) == vanilla_before  # needs no teacher: left alone


def test_a_truncated_log_is_damaged_and_the_advised_command_rebuilds_it(tiny_submitted: SweepRun, tmp_path: Path) -> None:
    root = copy_outputs(tiny_submitted, tmp_path / "out")
    student = StageFolders(root, stage_name(tiny_submitted.plan, "student_stage", "vanilla"))
    good = read_log(student.logs)
    student.log.write_bytes(student.log.read_bytes()[:100])
    assert "has 100 bytes" in student.done_problem()

    shown = run_runner("logs", str(student.logs))
    assert shown.returncode == 2 and str(student.log) in shown.stderr
    fixed = subprocess.run(advised_command(shown.stderr), capture_output=True, text=True, timeout=300)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert student.is_done() and read_log(student.logs)["epochs"] == good["epochs"]
    assert run_runner("logs", str(student.logs)).returncode == 0


def test_a_corrupt_checkpoint_names_force_and_force_works(tiny_in_process: SweepRun, tmp_path: Path, restore_torch_threads) -> None:
    teacher = stage_name(tiny_in_process.plan, "teacher_stage")
    folders = StageFolders(tmp_path, teacher)
    folders.weights.mkdir(parents=True)
    folders.checkpoint.write_bytes(b"these bytes are no checkpoint")
    from pipeline.store import CorruptFileError

    with pytest.raises(CorruptFileError) as raised:
        run_stage(tiny_in_process.plan.stages[teacher], tmp_path)
    command = advised_command(str(raised.value))
    assert command[-1] == "--force"
    fixed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert folders.is_done() and read_log(folders.logs)["resumed_after_epochs"] == []


def test_force_retrains_a_done_stage_from_scratch(tiny_submitted: SweepRun, tmp_path: Path, restore_torch_threads) -> None:
    root = copy_outputs(tiny_submitted, tmp_path / "out")
    teacher = StageFolders(root, stage_name(tiny_submitted.plan, "teacher_stage"))
    done_before = teacher.done_marker.read_bytes()
    assert runner.main(["stage", str(teacher.logs)]) == 0  # DONE: nothing to do
    assert teacher.done_marker.read_bytes() == done_before
    assert runner.main(["stage", str(teacher.logs), "--force"]) == 0
    log = read_log(teacher.logs)
    assert teacher.is_done() and teacher.done_marker.read_bytes() != done_before
    assert log["resumed_after_epochs"] == [] and len(log["epochs"]) == 2


def test_invalidate_downstream_reaches_dependants_of_every_sweep(tiny_submitted: SweepRun, tmp_path: Path) -> None:
    root = copy_outputs(tiny_submitted, tmp_path / "out")
    plan = tiny_submitted.plan
    teacher = stage_name(plan, "teacher_stage")
    built_from_teacher = {teacher, stage_name(plan, "teacher_evaluate_stage"), stage_name(plan, "student_stage", "kd"),
                          stage_name(plan, "evaluate_stage", "kd"), stage_name(plan, "evaluate_stage", "vanilla")}
    result = run_runner("invalidate", str(StageFolders(root, teacher).logs), "--downstream")
    assert result.returncode == 0, result.stderr
    assert f"invalidated {len(built_from_teacher)} stage(s)" in result.stdout
    for name in plan.stages:
        assert StageFolders(root, name).is_done() == (name not in built_from_teacher), name
    assert not StageFolders(root, teacher).checkpoint.exists()  # rebuilt from scratch, not resumed


# 4. Modes on a shared filesystem -----------------------------------------------------------------------------

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664)])
def test_written_files_take_the_umask_mode(tmp_path: Path, umask: int, mode: int) -> None:
    previous = os.umask(umask)
    try:
        write_atomic(tmp_path / "file.bin", b"data")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "file.bin").stat().st_mode) == mode


def test_a_stage_run_under_umask_002_leaves_group_writable_files(tiny_submitted: SweepRun, tmp_path: Path) -> None:
    root = tmp_path / "out"
    teacher = stage_name(tiny_submitted.plan, "teacher_stage")
    result = subprocess.run(
        [sys.executable, str(REPO / "runner.py"), "stage", teacher, "--sweep", str(tiny_submitted.sweep), "--root", str(root)],
        capture_output=True, text=True, timeout=300, preexec_fn=lambda: os.umask(0o002),
    )
    assert result.returncode == 0, result.stderr
    folders = StageFolders(root, teacher)
    written = [path for folder in (folders.logs, folders.weights) for path in folder.iterdir()]
    assert {"DONE", "log.pkl", "config.json", "Loss.png", "final.pt", "checkpoint.pt"} <= {path.name for path in written}
    assert {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in written} == {path.name: "0o664" for path in written}


# 8. Read commands skip what is not a stage folder -------------------------------------------------------------

def test_logs_and_plot_skip_folders_that_are_not_stages(tiny_submitted: SweepRun, tmp_path: Path) -> None:
    root = copy_outputs(tiny_submitted, tmp_path / "out")
    report = root / "logs" / "report-tiny"
    report.mkdir()
    (report / "report.md").write_text("| a |\n")
    folders = sorted(str(path) for path in (root / "logs").iterdir())
    for command in ("logs", "plot"):
        result = run_runner(command, *folders)
        assert result.returncode == 0, result.stderr
        assert result.stderr == f"note: skipping {report}: not a stage folder (no config.json or log.pkl)\n"
    assert "best epoch" in run_runner("logs", *folders).stdout
