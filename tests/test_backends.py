"""Backend behaviour that needs no running scheduler: resource mapping, idempotence, the lock,
a killed submit, and clear errors when a scheduler's commands are missing."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import submitit

from pipeline.backends.cluster import ClusterBackend, array_groups
from pipeline.backends.slurm import sbatch_parameters
from pipeline.manifest import Manifest, SubmitLockedError, submit_lock
from pipeline.plan import build_plan
from tests.conftest import REPO, write_sweep


class RecordingScheduler:
    """A scheduler whose arrays go to submitit's DebugExecutor (nothing runs) and whose queue is a dict."""

    name = "slurm"

    def __init__(self, folder: Path, die_on_array: int | None = None):
        self.folder = folder
        self.calls = 0
        self.die_on_array = die_on_array
        self.afters: list[list[str]] = []
        self.queue: dict[str, str] = {}

    def executor(self, folder: Path, resources: dict[str, Any], after: list[str], job_name: str) -> submitit.Executor:
        self.calls += 1
        if self.calls == self.die_on_array:
            raise KeyboardInterrupt  # the submitting process dies between two arrays
        self.afters.append(after)
        return submitit.DebugExecutor(folder=self.folder)

    def live_jobs(self, job_ids: list[str]) -> dict[str, str]:
        return {job_id: self.queue[job_id] for job_id in job_ids if job_id in self.queue}

    def cancel(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            self.queue.pop(job_id, None)


def noop(spec: dict, root: str) -> str:
    return spec["name"]


def test_resources_map_to_sbatch_options() -> None:
    parameters = sbatch_parameters({
        "time_min": 720, "cpus": 8, "gpus": 2, "mem_gb": 15.5, "partition": "gpu", "account": "proj",
        "qos": "high", "constraint": "a100", "extra_sbatch": ["--exclude=node13", "--exclusive"],
    })
    assert parameters["time"] == 720 and parameters["cpus_per_task"] == 8 and parameters["gpus_per_node"] == 2
    assert parameters["mem"] == "15872MB"
    assert (parameters["partition"], parameters["account"], parameters["qos"], parameters["constraint"]) == ("gpu", "proj", "high", "a100")
    assert parameters["additional_parameters"] == {"requeue": True, "exclude": "node13", "exclusive": True}
    assert parameters["signal_delay_s"] == 90
    assert sbatch_parameters({"time_min": 1})["signal_delay_s"] == 10  # shorter than the job itself
    assert "gpus_per_node" not in sbatch_parameters({"gpus": 0})


def test_one_array_per_kind_in_dependency_order(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path / "s.yaml", {"axes.method": ["vanilla", "kd", "ft", "tucker"], "axes.seed": [0, 1],
                                              "defaults.methods": {"ft": {"paraphraser_epochs": 1}}})
    plan = build_plan(sweep)
    groups = array_groups(list(plan.stages.values()))
    assert [group[0].kind for group in groups] == ["train_teacher", "pretrain_paraphraser", "train_student", "evaluate"]
    assert [len(group) for group in groups] == [1, 1, 8, 9]

    scheduler = RecordingScheduler(tmp_path / "debug")
    summary = ClusterBackend(scheduler, tmp_path / "out", tmp_path / "jobs", noop, report=lambda _: None).submit(plan)
    assert summary.arrays == 4 and scheduler.calls == 4 and len(summary.submitted) == len(plan.stages)
    teacher_job = summary.submitted[groups[0][0].name]
    assert scheduler.afters[0] == [] and teacher_job in scheduler.afters[1]  # the paraphraser array waits on the teacher
    assert set(scheduler.afters[3]) >= {summary.submitted[spec.name] for spec in groups[2]}  # evaluates wait on students


def test_a_killed_submit_leaves_a_manifest_the_next_submit_reads(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path / "s.yaml", {"axes.method": ["vanilla", "kd"]})
    plan = build_plan(sweep)
    jobs_dir = tmp_path / "jobs"
    dying = RecordingScheduler(tmp_path / "debug", die_on_array=3)
    with pytest.raises(KeyboardInterrupt):
        ClusterBackend(dying, tmp_path / "out", jobs_dir, noop, report=lambda _: None).submit(plan)
    recorded = Manifest.load(jobs_dir).stages  # valid JSON: written whole after each array
    first_two = {spec.name for group in array_groups(list(plan.stages.values()))[:2] for spec in group}
    assert set(recorded) == first_two

    alive = RecordingScheduler(tmp_path / "debug")
    alive.queue = {entry["job_id"]: "PENDING" for entry in recorded.values()}
    summary = ClusterBackend(alive, tmp_path / "out", jobs_dir, noop, report=lambda _: None).submit(plan)
    assert set(summary.skipped_live) == first_two  # still queued: not submitted twice
    assert set(summary.submitted) == set(plan.stages) - first_two


def test_a_second_submit_of_the_same_sweep_is_refused_while_one_runs(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path / "s.yaml")
    root = tmp_path / "out"
    with submit_lock(root / "jobs" / "tiny"):
        with pytest.raises(SubmitLockedError):
            with submit_lock(root / "jobs" / "tiny"):
                pass
        result = subprocess.run([sys.executable, str(REPO / "runner.py"), "submit", str(sweep), "--root", str(root)],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "another submit of this sweep is running" in result.stderr
    assert not (root / "logs").exists()


@pytest.mark.parametrize("backend, command", [("slurm", "sbatch"), ("pbs", "qsub")])
def test_missing_scheduler_commands_are_named(backend: str, command: str, tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path / "s.yaml")
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    environment = dict(os.environ, PATH=str(empty_bin))
    result = subprocess.run([sys.executable, str(REPO / "runner.py"), "submit", str(sweep), "--backend", backend,
                             "--root", str(tmp_path / "out")], capture_output=True, text=True, env=environment, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and f"{backend} backend: '{command}' not found on PATH" in result.stderr


def test_local_status_reads_the_same_manifest(tiny_submitted, capsys: pytest.CaptureFixture[str]) -> None:
    import runner

    code = runner.main(["status", str(tiny_submitted.sweep), "--root", str(tiny_submitted.root)])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert lines[-1] == f"{len(build_plan(tiny_submitted.sweep).stages)} done"


def test_local_cancel_stops_a_running_stage_and_blocks_its_dependants(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path / "s.yaml", {"axes.method": ["kd"], "defaults.teacher.epochs": 500})
    root = tmp_path / "out"
    runner_py = str(REPO / "runner.py")
    submit = subprocess.Popen([sys.executable, runner_py, "submit", str(sweep), "--root", str(root)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    plan = build_plan(sweep)
    teacher = plan.experiments[0].teacher_stage
    jobs_dir = root / "jobs" / "tiny"
    deadline = time.monotonic() + 120
    while Manifest.load(jobs_dir).stages.get(teacher, {}).get("state") != "running":
        assert time.monotonic() < deadline and submit.poll() is None, "the teacher never started"
        time.sleep(0.2)

    cancel = subprocess.run([sys.executable, runner_py, "cancel", str(sweep), "--root", str(root)],
                            capture_output=True, text=True, timeout=120)
    assert cancel.returncode == 0 and "cancelled 1 stage(s)" in cancel.stdout, cancel.stdout + cancel.stderr
    assert submit.wait(timeout=120) == 1  # the submit ends: its teacher was cancelled, the rest blocked

    status = subprocess.run([sys.executable, runner_py, "status", str(sweep), "--root", str(root)],
                            capture_output=True, text=True, timeout=120)
    states = {line.split()[0]: line.split()[1] for line in status.stdout.splitlines()[1:-1]}
    assert states[teacher] == "cancelled"
    assert states[plan.experiments[0].student_stage] == "blocked"


def test_resubmitting_a_failed_stage_replaces_its_queued_dependants(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path / "s.yaml", {"axes.method": ["kd"]})
    plan = build_plan(sweep)
    jobs_dir = tmp_path / "jobs"
    first = RecordingScheduler(tmp_path / "debug")
    submitted = ClusterBackend(first, tmp_path / "out", jobs_dir, noop, report=lambda _: None).submit(plan).submitted
    teacher = plan.experiments[0].teacher_stage

    again = RecordingScheduler(tmp_path / "debug")  # the teacher failed and left the queue; the rest still wait
    again.queue = {job: "PENDING" for name, job in submitted.items() if name != teacher}
    summary = ClusterBackend(again, tmp_path / "out", jobs_dir, noop, report=lambda _: None).submit(plan)
    assert set(summary.submitted) == set(plan.stages)  # the teacher and everything downstream of it
    assert again.queue == {}  # the old dependants were cancelled
