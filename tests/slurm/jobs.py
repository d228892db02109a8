"""Submitting to and watching jobs on the test cluster, with every wait bounded, and a fake stage job.

States come from ``sacct`` (the accounting database), which keeps a job after ``squeue`` forgets it;
a job can take a moment to show up there after ``sbatch`` returns, so the waits poll.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from pipeline.store import StageFolders
from tests.slurm.cluster import LocalSlurmCluster

FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
POLL_S = 0.3

Value = TypeVar("Value")


class WaitTimeout(AssertionError):
    """A bounded wait ran out; the message says what was awaited and what was last seen."""


def wait_for(probe: Callable[[], Value], done: Callable[[Value], bool], timeout: float, what: str) -> Value:
    """Calls ``probe`` until ``done`` accepts its value; returns that value or fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise WaitTimeout(f"waited {timeout:.0f} s for {what}; last seen: {value!r}")
        time.sleep(POLL_S)


def submit(cluster: LocalSlurmCluster, *sbatch_args: str) -> str:
    """``sbatch --parsable ARGS``; returns the job id."""
    return cluster.run("sbatch", "--parsable", *sbatch_args).stdout.strip().split(";")[0]


def job_states(cluster: LocalSlurmCluster, job_id: str) -> dict[str, str]:
    """``{job or array task id: state}`` from sacct, allocations only; ``CANCELLED by 0`` reads ``CANCELLED``."""
    result = cluster.run("sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State", check=False, timeout=15)
    states = {}
    for line in result.stdout.splitlines():
        if "|" in line:
            job, state = line.split("|", 1)
            states[job] = state.split()[0] if state else ""
    return states


def wait_finished(cluster: LocalSlurmCluster, job_id: str, timeout: float = 60, tasks: int = 1) -> dict[str, str]:
    """Waits until sacct lists ``tasks`` allocations of ``job_id`` (array tasks), all finished."""
    return wait_for(
        lambda: job_states(cluster, job_id),
        lambda states: len(states) == tasks and all(state in FINISHED for state in states.values()),
        timeout, f"job {job_id} ({tasks} task(s)) to finish",
    )


def wait_state(cluster: LocalSlurmCluster, job_id: str, state: str, timeout: float = 60) -> None:
    """Waits until sacct shows ``job_id`` in ``state`` (``RUNNING``, ``PENDING``...)."""
    wait_for(lambda: job_states(cluster, job_id).get(job_id), lambda seen: seen == state, timeout,
             f"job {job_id} to be {state}")


def wait_file_text(path: Path, expected: str, timeout: float = 60) -> None:
    """Waits until ``path`` holds ``expected`` (stripped): how a job tells the test it got somewhere."""
    wait_for(lambda: path.read_text().strip() if path.is_file() else None, lambda text: text == expected,
             timeout, f"{path} to read {expected!r}")


def fake_stage(spec: dict[str, Any], root: str) -> str:
    """A stage job that trains nothing, for tests of when jobs start: submit it in place of StageJob.

    It fails unless its upstream stages are DONE (as a real stage does), sleeps the seconds written in
    ``<root>/sleep/<stage>`` if that file exists, writes DONE, and records ``<start> <end>`` (epoch
    seconds) in ``<root>/times/<stage>``. The jobs import it by name: put the repository on PYTHONPATH.
    """
    folder, name = Path(root), spec["name"]
    started = time.time()
    missing = [up for up in spec["upstream"].values() if not StageFolders(folder, up).is_done()]
    if missing:
        raise RuntimeError(f"{name} started before its upstream {missing[0]} was DONE")
    delay = folder / "sleep" / name
    if delay.is_file():
        time.sleep(float(delay.read_text()))
    StageFolders(folder, name).mark_done()
    (folder / "times").mkdir(exist_ok=True)
    (folder / "times" / name).write_text(f"{started} {time.time()}")
    return name


def stage_times(root: Path, name: str) -> tuple[float, float]:
    """(start, end) that ``fake_stage`` recorded for a stage."""
    start, end = (root / "times" / name).read_text().split()
    return float(start), float(end)
