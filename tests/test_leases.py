"""One stage hash, one live runner (issue 6, points 1 and 2): the lease, two sweeps sharing a
teacher, and a re-submit after the submitting terminal was killed while its stages trained."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.leases import LEASE_FILE, LeaseHeldError, LeaseLostError, StageLease, holder_alive, live_lease, read_lease
from pipeline.logfiles import read_log
from pipeline.manifest import Manifest
from pipeline.plan import build_plan
from pipeline.store import StageFolders
from tests.conftest import RUNNER, run_runner, stage_name, write_sweep


def write_foreign_lease(folder: Path, **fields) -> None:
    """A lease as another runner would have left it (by default: this host, a PID that is gone)."""
    folder.mkdir(parents=True, exist_ok=True)
    lease = {"token": "other", "host": socket.gethostname(), "pid": dead_pid(), "pid_started": None,
             "job_id": None, "started_at": time.time(), "timeout_s": 300.0, **fields}
    (folder / LEASE_FILE).write_text(json.dumps(lease))


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# The lease itself --------------------------------------------------------------------------------------------

def test_a_live_lease_keeps_a_second_runner_out(tmp_path: Path) -> None:
    with StageLease.acquire(tmp_path / "stage") as first:
        with pytest.raises(LeaseHeldError) as held:
            StageLease.acquire(tmp_path / "stage")
        assert "already running elsewhere" in str(held.value) and f"pid {os.getpid()}" in str(held.value)
        assert first.holds()
    assert not (tmp_path / "stage" / LEASE_FILE).exists()  # released


def test_a_dead_holder_is_taken_over_and_named(tmp_path: Path) -> None:
    folder = tmp_path / "stage"
    write_foreign_lease(folder)
    assert live_lease(folder) is None
    with StageLease.acquire(folder) as lease:
        assert lease.taken_over is not None and lease.taken_over.token == "other"
        assert read_lease(folder).pid == os.getpid()


def test_a_stale_heartbeat_from_another_host_is_taken_over(tmp_path: Path) -> None:
    folder = tmp_path / "stage"
    write_foreign_lease(folder, host="node-elsewhere", pid=1, timeout_s=60.0)
    assert live_lease(folder) is not None  # fresh: another host's PID cannot be checked
    old = time.time() - 61
    os.utime(folder / LEASE_FILE, (old, old))
    assert live_lease(folder) is None
    with StageLease.acquire(folder) as lease:
        assert lease.taken_over.host == "node-elsewhere"


def test_a_requeued_job_takes_over_its_own_earlier_lease(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "stage"
    write_foreign_lease(folder, host="node-before-requeue", pid=1, job_id="4242_3")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert not holder_alive(read_lease(folder))
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")  # another task of the array: the holder may be alive
    assert holder_alive(read_lease(folder))


def test_a_runner_whose_lease_was_taken_over_stops(tmp_path: Path) -> None:
    folder = tmp_path / "stage"
    lease = StageLease.acquire(folder, timeout_s=60.0)
    try:
        lease.check()
        (folder / LEASE_FILE).unlink()
        write_foreign_lease(folder, pid=os.getppid())  # someone else's, alive
        with pytest.raises(LeaseLostError):
            lease.check()
    finally:
        lease.release()
    assert read_lease(folder).token == "other"  # release never removes another runner's lease


def test_the_heartbeat_moves_while_the_holder_works(tmp_path: Path) -> None:
    folder = tmp_path / "stage"
    with StageLease.acquire(folder, timeout_s=5.0):
        first = (folder / LEASE_FILE).stat().st_mtime_ns
        time.sleep(1.3)  # the beat is every timeout / 10 = 0.5 s
        assert (folder / LEASE_FILE).stat().st_mtime_ns > first


# Two sweeps, one teacher --------------------------------------------------------------------------------------

TEACHER_EPOCHS = 8


def sharing_sweeps(tmp_path: Path) -> tuple[Path, Path]:
    changes = {"axes.method": ["kd"], "defaults.teacher.epochs": TEACHER_EPOCHS, "defaults.student.epochs": 1}
    first = write_sweep(tmp_path / "first.yaml", {**changes, "name": "first", "axes.seed": [0]})
    second = write_sweep(tmp_path / "second.yaml", {**changes, "name": "second", "axes.seed": [1]})
    return first, second


def start_submit(sweep: Path, root: Path, log: Path) -> subprocess.Popen:
    environment = {key: value for key, value in os.environ.items() if key != "KDBENCH_ROOT"}
    return subprocess.Popen(
        [sys.executable, str(RUNNER), "submit", str(sweep), "--root", str(root)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=environment, start_new_session=True,
    )


def wait_for_lease(folders: StageFolders, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 240
    while read_lease(folders.logs) is None:
        assert process.poll() is None, f"submit ended before the teacher started: {log.read_text()}"
        assert time.monotonic() < deadline, "the teacher never took its lease"
        time.sleep(0.05)


def assert_trained_once(folders: StageFolders) -> None:
    log = read_log(folders.logs)
    assert [entry["epoch"] for entry in log["epochs"]] == list(range(1, TEACHER_EPOCHS + 1))
    assert log["resumed_after_epochs"] == [] and log["lease_takeover"] is None
    assert folders.is_done()


def test_two_sweeps_sharing_a_teacher_train_it_once(tmp_path: Path) -> None:
    first, second = sharing_sweeps(tmp_path)
    root = tmp_path / "out"
    plan_first, plan_second = build_plan(first), build_plan(second)
    teacher = stage_name(plan_first, "teacher_stage")
    assert teacher == stage_name(plan_second, "teacher_stage")
    folders = StageFolders(root, teacher)

    process_first = start_submit(first, root, tmp_path / "first.log")
    wait_for_lease(folders, process_first, tmp_path / "first.log")
    result_second = run_runner("submit", str(second), "--root", str(root), timeout=600)
    assert process_first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()
    assert result_second.returncode == 0, result_second.stdout + result_second.stderr

    assert f"waiting  {teacher}: already running elsewhere" in result_second.stdout
    assert_trained_once(folders)
    assert Manifest.load(root / "jobs" / "second").stages[teacher]["state"] == "done"
    for plan in (plan_first, plan_second):
        assert all(StageFolders(root, name).is_done() for name in plan.stages)


def test_a_resubmit_after_kill_9_of_submit_starts_no_second_copy(tmp_path: Path) -> None:
    first, _ = sharing_sweeps(tmp_path)
    root = tmp_path / "out"
    plan = build_plan(first)
    folders = StageFolders(root, stage_name(plan, "teacher_stage"))

    killed = start_submit(first, root, tmp_path / "killed.log")
    wait_for_lease(folders, killed, tmp_path / "killed.log")
    os.kill(killed.pid, signal.SIGKILL)  # the terminal is lost; the teacher's job process goes on
    killed.wait()
    holder = read_lease(folders.logs)
    assert live_lease(folders.logs) is not None and holder.pid != killed.pid

    again = run_runner("submit", str(first), "--root", str(root), timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"already running elsewhere (host {socket.gethostname()}, pid {holder.pid}" in again.stdout
    assert_trained_once(folders)
    assert read_log(folders.logs)["environment"]["pid"] == holder.pid
    assert all(StageFolders(root, name).is_done() for name in plan.stages)


# On a cluster: a stage another sweep queued, or another runner holds, is not submitted again ----------------

def test_a_cluster_submit_waits_on_the_teacher_job_another_sweep_queued(tmp_path: Path) -> None:
    from pipeline.backends.cluster import ClusterBackend
    from tests.test_backends import RecordingScheduler, noop

    first, second = sharing_sweeps(tmp_path)
    root = tmp_path / "out"
    plan_first, plan_second = build_plan(first), build_plan(second)
    teacher = stage_name(plan_first, "teacher_stage")
    scheduler = RecordingScheduler(tmp_path / "debug")
    submitted = ClusterBackend(scheduler, root, root / "jobs" / "first", noop, report=lambda _: None).submit(plan_first).submitted
    scheduler.queue = {job: "PENDING" for job in submitted.values()}  # nothing has started: no lease yet

    summary = ClusterBackend(scheduler, root, root / "jobs" / "second", noop, report=lambda _: None).submit(plan_second)
    assert teacher not in summary.submitted and summary.skipped_elsewhere[teacher] == f"sweep first, job {submitted[teacher]}"
    manifest = Manifest.load(root / "jobs" / "second").stages
    assert "job_id" not in manifest[teacher] and manifest[teacher]["held_by_job"] == submitted[teacher]
    student = stage_name(plan_second, "student_stage")
    assert submitted[teacher] in manifest[student]["after"]  # its own teacher is the first sweep's job


def test_a_cluster_submit_skips_a_stage_whose_live_runner_holds_its_lease(tmp_path: Path) -> None:
    from pipeline.backends.cluster import ClusterBackend
    from tests.test_backends import RecordingScheduler, noop

    first, _ = sharing_sweeps(tmp_path)
    root = tmp_path / "out"
    plan = build_plan(first)
    teacher = stage_name(plan, "teacher_stage")
    write_foreign_lease(StageFolders(root, teacher).logs, pid=os.getppid(), job_id="77_0")  # alive: our parent
    scheduler = RecordingScheduler(tmp_path / "debug")
    scheduler.queue = {"77_0": "RUNNING"}
    summary = ClusterBackend(scheduler, root, root / "jobs" / "first", noop, report=lambda _: None).submit(plan)
    assert teacher not in summary.submitted and "pid" in summary.skipped_elsewhere[teacher]
    student = stage_name(plan, "student_stage")
    assert Manifest.load(root / "jobs" / "first").stages[student]["after"] == ["77_0"]
