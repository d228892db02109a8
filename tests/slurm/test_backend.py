"""Real sweeps submitted through the local Slurm cluster: arrays, shared stages, failures, requeue.

Every test here sends real ``sbatch``/``squeue``/``scancel``/``scontrol`` commands to the one-node
cluster that ``tests/slurm/conftest.py`` starts, and checks the files the jobs leave behind.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.backends.cluster import ClusterBackend
from pipeline.backends.slurm import SlurmScheduler
from pipeline.logfiles import read_log
from pipeline.manifest import Manifest, submit_lock
from pipeline.plan import build_plan
from pipeline.store import StageFolders
from tests.slurm.jobs import fake_stage, stage_times

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
    """Every job and array task in the queue, one id each (``--array``: pending tasks are not folded into ``7_[0-3]``)."""
    listed = subprocess.run(["squeue", "--noheader", "--array", "--format=%i"], capture_output=True, text=True, check=True)
    return listed.stdout.split()


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
    # One sbatch per array, and one scontrol each narrowing the students' and the evaluates' waits.
    assert "6 scheduler call(s)" in result.stdout
    assert all(StageFolders(root, name).is_done() for name in plan.stages)

    manifest = Manifest.load(root / "jobs" / "slurm-tiny").stages
    student_arrays = {manifest[name]["job_id"].split("_")[0] for name, spec in plan.stages.items() if spec.kind == "train_student"}
    assert len(student_arrays) == 1  # three students, one sbatch
    teacher = next(name for name, spec in plan.stages.items() if spec.kind == "train_teacher")
    assert read_log(StageFolders(root, teacher).logs)["environment"]["slurm_job_id"]  # really ran under Slurm

    again = runner("submit", str(sweep), "--backend", "slurm", "--root", str(root))
    assert again.returncode == 0, again.stderr
    assert "nothing to do: all 9 stages of sweep 'slurm-tiny' are DONE" in again.stdout


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
    recorded = {entry["job_id"] for entry in Manifest.load(root / "jobs" / "slurm-fail").stages.values()}
    assert not recorded & set(our_jobs())  # --wait returned only once the doomed students had left the queue
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
        # Enough epochs that the teacher is still training when the interrupt arrives, however fast
        # the machine: a requeue of a finished job reruns a DONE stage, which resumes nothing.
        {"teacher": {"epochs": 16, "lr_schedule": "cosine"}, "student": {"epochs": 1}},
    )
    root = tmp_path / "out"
    assert runner("submit", str(sweep), "--backend", "slurm", "--root", str(root)).returncode == 0
    teacher = build_plan(sweep).experiments[0].teacher_stage
    folders = StageFolders(root, teacher)
    wait_until(lambda: folders.log.is_file() and len(read_log(folders.logs)["epochs"]) >= 2, 300, "two teacher epochs")
    entry = Manifest.load(root / "jobs" / "slurm-requeue").stages[teacher]
    subprocess.run([*interrupt, entry["job_id"]], check=True, capture_output=True)
    interrupted_after = len(read_log(folders.logs)["epochs"])
    assert not folders.is_done() and interrupted_after < 16, "the teacher finished before the interrupt: no resume to test"

    wait_until(folders.is_done, 600, "the interrupted teacher to finish")
    log = read_log(folders.logs)
    assert [item["epoch"] for item in log["epochs"]] == list(range(1, 17))
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
    error = result.stderr.splitlines()
    assert len(error) == 1 and error[0].startswith("error: "), result.stderr  # sbatch's own lines are inside it
    assert "invalid partition" in error[0].lower() and "train_student array" in error[0], error[0]
    jobs_dir = root / "jobs" / "slurm-refused"
    manifest = Manifest.load(jobs_dir).stages
    experiment = build_plan(sweep).experiments[0]
    teacher_job = manifest[experiment.teacher_stage]["job_id"]
    assert manifest[experiment.student_stage]["state"] == "refused"
    assert {entry["state"] for name, entry in manifest.items() if name != experiment.student_stage} == {"rolled back"}
    reason = manifest[experiment.student_stage]["reason"]
    assert "invalid partition" in reason.lower() and reason in error[0]
    wait_until(lambda: teacher_job not in our_jobs(), 30, "the rolled-back teacher to leave the queue")
    assert not [path for path in (jobs_dir / "slurm").rglob("*") if path.is_file()]  # no pickles, no scripts

    status = runner("status", str(sweep), "--root", str(root))
    rows = {line.split()[0]: line for line in status.stdout.splitlines()[1:-1]}
    assert f"refused by scheduler: {reason}" in rows[experiment.student_stage]
    assert f"the train_student array was refused by scheduler: {reason}" in rows[experiment.teacher_stage]


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


SLOW_TEACHER_S = 30


def test_a_stage_waits_only_on_its_own_upstream_jobs(slurm_cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One teacher sleeps: the vanilla student (no teacher) and the fast teacher's students and evaluates
    all run meanwhile; only the slow teacher's own dependants wait for it. Fake stage jobs (tests/slurm/jobs.py)."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the jobs import tests.slurm.jobs
    sweep = write_sweep(
        tmp_path, "slurm-waits",
        {"pair": ["resnet20:resnet8x0.25", "resnet56:resnet8x0.25"], "method": ["vanilla", "kd"]},
        {"teacher": {"epochs": 1}, "student": {"epochs": 1}},
    )
    plan = build_plan(sweep)
    fast = [experiment for experiment in plan.experiments if experiment.teacher == "resnet20"]
    slow = [experiment for experiment in plan.experiments if experiment.teacher == "resnet56"]
    root, jobs_dir = tmp_path / "out", tmp_path / "out" / "jobs" / "slurm-waits"
    (root / "sleep").mkdir(parents=True)
    (root / "sleep" / slow[0].teacher_stage).write_text(str(SLOW_TEACHER_S))
    scheduler = SlurmScheduler()
    with submit_lock(jobs_dir):
        summary = ClusterBackend(scheduler, root, jobs_dir, fake_stage, report=print).submit(plan)
    assert summary.arrays == 3
    wait_until(lambda: all(StageFolders(root, name).is_done() for name in plan.stages), 300, "every stage to be DONE")

    slow_teacher_done = stage_times(root, slow[0].teacher_stage)[1]
    vanilla = next(experiment for experiment in fast if experiment.method == "vanilla")
    kd = next(experiment for experiment in fast if experiment.method == "kd")
    for name in (vanilla.student_stage, kd.student_stage, kd.evaluate_stage, vanilla.evaluate_stage, kd.teacher_evaluate_stage):
        assert stage_times(root, name)[0] < slow_teacher_done, f"{name} waited for the slow teacher"
    assert stage_times(root, kd.evaluate_stage)[0] >= stage_times(root, kd.student_stage)[1]  # and for its own student
    for experiment in slow:
        assert stage_times(root, experiment.evaluate_stage)[0] >= slow_teacher_done
    assert stage_times(root, next(e for e in slow if e.method == "kd").student_stage)[0] >= slow_teacher_done


def test_a_two_task_teacher_job_trains_as_two_gloo_ranks(slurm_cluster, tmp_path: Path) -> None:
    """``resources.train_teacher.tasks: 2``: one sbatch job of two tasks (srun), which become ranks 0
    and 1 of torch.distributed (gloo on this CPU node) and train one teacher stage together."""
    resources = {**RESOURCES, "train_teacher": {"tasks": 2}}
    sweep = write_sweep(tmp_path, "slurm-ranks", {"pair": ["resnet20:resnet8x0.25"], "method": ["vanilla"], "seed": [0]},
                        {"teacher": {"epochs": 2, "lr_schedule": "cosine"}, "student": {"epochs": 1}}, resources)
    root = tmp_path / "out"
    result = runner("submit", str(sweep), "--backend", "slurm", "--wait", "--root", str(root))
    assert result.returncode == 0, result.stdout + result.stderr
    teacher = next(name for name, spec in build_plan(sweep).stages.items() if spec.kind == "train_teacher")
    log = read_log(StageFolders(root, teacher).logs)
    assert log["environment"]["ranks"] == 2 and log["environment"]["slurm_job_id"]
    assert [entry["epoch"] for entry in log["epochs"]] == [1, 2]
    assert StageFolders(root, teacher).is_done()
