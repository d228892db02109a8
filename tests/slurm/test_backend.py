"""Real sweeps submitted through the local Slurm cluster: arrays, shared stages, failures, requeue.

Every test here sends real ``sbatch``/``squeue``/``scancel``/``scontrol`` commands to the one-node
cluster that ``tests/slurm/conftest.py`` starts, and checks the files the jobs leave behind.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.logfiles import read_log
from pipeline.manifest import Manifest
from pipeline.plan import build_plan
from pipeline.store import StageFolders

REPO = Path(__file__).resolve().parents[2]
RESOURCES = {"default": {"cpus": 1, "mem_gb": 1, "time_min": 10}}


def write_sweep(folder: Path, name: str, axes: dict[str, Any], defaults: dict[str, Any], resources: dict[str, Any] = RESOURCES) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "axes": {"dataset": ["digits"], **axes}, "defaults": defaults, "resources": resources}))
    return path


def runner(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "runner.py"), *args], capture_output=True, text=True, timeout=timeout)


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.5)


def our_jobs() -> list[str]:
    return subprocess.run(["squeue", "--noheader", "--format=%i"], capture_output=True, text=True, check=True).stdout.split()


def test_shared_teacher_and_paraphraser_go_out_as_one_array_per_kind(slurm_cluster, tmp_path: Path) -> None:
    sweep = write_sweep(
        tmp_path, "slurm-tiny",
        {"pair": ["resnet20:resnet8x0.25"], "method": ["kd", "tucker", "ft"], "seed": [0]},
        {"teacher": {"epochs": 2, "lr_schedule": "cosine"}, "student": {"epochs": 1}, "methods": {"ft": {"paraphraser_epochs": 1}}},
    )
    root = tmp_path / "out"
    result = runner("submit", str(sweep), "--backend", "slurm", "--wait", "--root", str(root))
    assert result.returncode == 0, result.stdout + result.stderr
    plan = build_plan(sweep)
    assert "submitted 9 stage(s) in 4 array(s)" in result.stdout  # teacher, paraphraser, students, evaluates
    assert "4 scheduler call(s)" in result.stdout
    assert all(StageFolders(root, name).is_done() for name in plan.stages)

    manifest = Manifest.load(root / "jobs" / "slurm-tiny").stages
    student_arrays = {manifest[name]["job_id"].split("_")[0] for name, spec in plan.stages.items() if spec.kind == "train_student"}
    assert len(student_arrays) == 1  # three students, one sbatch
    teacher = next(name for name, spec in plan.stages.items() if spec.kind == "train_teacher")
    assert read_log(StageFolders(root, teacher).logs)["environment"]["slurm_job_id"]  # really ran under Slurm

    again = runner("submit", str(sweep), "--backend", "slurm", "--root", str(root))
    assert again.returncode == 0, again.stderr
    assert "submitted 0 stage(s)" in again.stdout and "9 already DONE" in again.stdout


def test_a_failed_teacher_fails_only_its_own_dependants(slurm_cluster, tmp_path: Path) -> None:
    # Two teachers differing only in learning rate; lr 1e6 makes the loss non-finite at once.
    sweep = write_sweep(
        tmp_path, "slurm-fail",
        {"pair": ["resnet20:resnet8x0.25"], "method": ["kd"], "teacher.lr": [0.05, 1.0e6]},
        {"teacher": {"epochs": 1}, "student": {"epochs": 1}},
    )
    root = tmp_path / "out"
    result = runner("submit", str(sweep), "--backend", "slurm", "--wait", "--root", str(root))
    assert result.returncode == 1, result.stdout + result.stderr
    plan = build_plan(sweep)
    good, bad = plan.experiments
    assert StageFolders(root, good.evaluate_stage).is_done()
    assert not StageFolders(root, bad.teacher_stage).is_done()
    assert not StageFolders(root, bad.student_stage).is_done()

    status = runner("status", str(sweep), "--root", str(root))
    assert status.returncode == 3
    lines = {line.split()[0]: line for line in status.stdout.splitlines()[1:-1]}
    assert " failed " in lines[bad.teacher_stage]
    assert "loss term 'ce' is" in lines[bad.teacher_stage]  # the stderr tail names the non-finite term
    assert f"upstream {bad.teacher_stage}" in lines[bad.student_stage]
    assert " done " in lines[good.student_stage]
    stderr = Path(Manifest.load(root / "jobs" / "slurm-fail").stages[bad.student_stage]["stderr"]).read_text()
    assert f"upstream teacher stage {bad.teacher_stage} is not DONE" in stderr


@pytest.mark.parametrize("interrupt, job_log_says", [
    # Slurm requeues the job itself (as an admin or a node failure would).
    (["scontrol", "requeue"], ()),
    # USR2 is what Slurm sends before a time limit or on preemption (--signal): submitit's handler
    # in the job must checkpoint and requeue the StageJob.
    (["scancel", "--signal=USR2"], ("Caught signal SIGUSR2", "Requeued job")),
], ids=["scontrol-requeue", "usr2-preemption"])
def test_interrupted_stage_resumes_and_logs_every_epoch_once(
    slurm_cluster, tmp_path: Path, interrupt: list[str], job_log_says: tuple[str, ...]
) -> None:
    sweep = write_sweep(
        tmp_path, "slurm-requeue",
        {"pair": ["resnet56:resnet8x0.25"], "method": ["vanilla"]},
        {"teacher": {"epochs": 6, "lr_schedule": "cosine"}, "student": {"epochs": 1}},
    )
    root = tmp_path / "out"
    assert runner("submit", str(sweep), "--backend", "slurm", "--root", str(root)).returncode == 0
    teacher = build_plan(sweep).experiments[0].teacher_stage
    folders = StageFolders(root, teacher)
    wait_until(lambda: folders.log.is_file() and len(read_log(folders.logs)["epochs"]) >= 2, 300, "two teacher epochs")
    entry = Manifest.load(root / "jobs" / "slurm-requeue").stages[teacher]
    subprocess.run([*interrupt, entry["job_id"]], check=True, capture_output=True)

    wait_until(folders.is_done, 600, "the interrupted teacher to finish")
    log = read_log(folders.logs)
    assert [item["epoch"] for item in log["epochs"]] == [1, 2, 3, 4, 5, 6]
    assert log["resumed_after_epochs"] and log["resumed_after_epochs"][0] >= 2
    job_log = Path(entry["stdout"]).read_text()
    assert all(line in job_log for line in job_log_says)  # for USR2: submitit's own handler requeued it


def test_a_partition_the_cluster_lacks_is_refused_and_rolled_back(slurm_cluster, tmp_path: Path) -> None:
    sweep = write_sweep(
        tmp_path, "slurm-refused",
        {"pair": ["resnet20:resnet8x0.25"], "method": ["kd"]},
        {"teacher": {"epochs": 1}, "student": {"epochs": 1}},
        {**RESOURCES, "train_student": {"partition": "nosuchpartition"}},
    )
    root = tmp_path / "out"
    result = runner("submit", str(sweep), "--backend", "slurm", "--root", str(root))
    assert result.returncode == 2
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1, result.stderr
    assert "invalid partition" in error[0].lower() and "train_student array" in error[0], error[0]
    manifest = Manifest.load(root / "jobs" / "slurm-refused").stages
    teacher_job = next(entry["job_id"] for entry in manifest.values() if entry["kind"] == "train_teacher")
    assert manifest and all(entry["state"] == "rolled back" for entry in manifest.values())
    wait_until(lambda: teacher_job not in our_jobs(), 30, "the rolled-back teacher to leave the queue")


def test_status_and_cancel_on_a_running_sweep(slurm_cluster, tmp_path: Path) -> None:
    sweep = write_sweep(
        tmp_path, "slurm-cancel",
        {"pair": ["resnet56:resnet8x0.25"], "method": ["kd"]},
        {"teacher": {"epochs": 200}, "student": {"epochs": 1}},
    )
    root = tmp_path / "out"
    assert runner("submit", str(sweep), "--backend", "slurm", "--root", str(root)).returncode == 0
    plan = build_plan(sweep)
    experiment = plan.experiments[0]
    status = runner("status", str(sweep), "--root", str(root))
    rows = {line.split()[0]: line.split()[1] for line in status.stdout.splitlines()[1:-1]}
    assert rows[experiment.teacher_stage] in ("queued", "running") and rows[experiment.student_stage] == "queued"

    cancelled = runner("cancel", str(sweep), "--root", str(root))
    assert cancelled.returncode == 0 and "cancelled 4 stage(s)" in cancelled.stdout, cancelled.stdout + cancelled.stderr
    jobs = [entry["job_id"] for entry in Manifest.load(root / "jobs" / "slurm-cancel").stages.values()]
    wait_until(lambda: not set(jobs) & set(our_jobs()), 60, "cancelled jobs to leave the queue")
    after = runner("status", str(sweep), "--root", str(root))
    rows = {line.split()[0]: line.split()[1] for line in after.stdout.splitlines()[1:-1]}
    assert rows[experiment.teacher_stage] == "cancelled"
    assert rows[experiment.student_stage] == "blocked"
