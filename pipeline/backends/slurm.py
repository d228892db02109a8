"""Slurm through submitit's SlurmExecutor: the sweep's resources as sbatch options, and queue queries.

Queue state comes from ``squeue`` (jobs still queued or running) plus the stage files, never from
``sacct``: clusters without slurmdbd accounting have no sacct, and a finished stage is already
told by its DONE marker (done) or its absence (failed or cancelled).

An array goes out with the union of its tasks' dependencies; ``set_task_dependencies`` then gives each
task its own with ``scontrol update JobId=<array>_<task> Dependency=...``, which Slurm supports on the
pending tasks of an array (job_array.html: individual tasks can be modified with
``ArrayJobID_ArrayTaskID``; a modified task gets its own job record and keeps its ``123_4`` id).
"""
from __future__ import annotations

import getpass
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import submitit

from pipeline.backends import BackendError
from pipeline.sweep_schema import tasks_per_node


TASK_STARTED = ("Job is no longer pending execution", "Job has already finished")
"""scontrol's refusals to update a task that has already started: its wider wait was over anyway."""


def run_command(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    """Runs one scheduler command, output captured; the single place this module talks to Slurm."""
    if shutil.which(argv[0]) is None:
        raise BackendError(f"slurm backend: '{argv[0]}' not found on PATH; run on a Slurm login node or use --backend local")
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=120)


def command_output(argv: list[str]) -> str:
    """stdout of a command that must succeed; its failure is a one-line BackendError."""
    finished = run_command(argv)
    if finished.returncode != 0:
        message = " ".join((finished.stderr or finished.stdout).split())
        raise BackendError(f"slurm backend: {' '.join(argv[:2])} failed: {message}")
    return finished.stdout


def dependency_option(after: list[str]) -> str:
    """sbatch's and scontrol's dependency value: ``afterany:1_0:2``, or empty for none."""
    return "afterany:" + ":".join(after) if after else ""


def sbatch_parameters(resources: dict[str, Any]) -> dict[str, Any]:
    """submitit SlurmExecutor parameters for one stage kind's resources (see pipeline/sweep_schema.py)."""
    time_min = int(resources.get("time_min", 60))
    parameters: dict[str, Any] = {
        "time": time_min,
        # USR2 this long before the limit makes submitit checkpoint and requeue the stage; a lead
        # longer than the job itself (submitit's 90 s on a 1-minute job) would requeue it at once.
        "signal_delay_s": min(90, max(10, time_min * 6)),
        "cpus_per_task": int(resources.get("cpus", 1)),
        "mem": f"{math.ceil(float(resources.get('mem_gb', 4)) * 1024)}MB",  # sbatch refuses fractional sizes
        "nodes": int(resources.get("nodes") or 1),
        "ntasks_per_node": tasks_per_node(resources),  # one rank per task (stages/distributed.py)
    }
    if int(resources.get("gpus", 0)) > 0:
        parameters["gpus_per_node"] = int(resources["gpus"])
    for key in ("partition", "account", "qos", "constraint"):
        if resources.get(key):
            parameters[key] = resources[key]
    extra: dict[str, Any] = {"requeue": True}
    for option in resources.get("extra_sbatch") or []:
        key, has_value, value = option.lstrip("-").partition("=")
        extra[key.replace("-", "_")] = value if has_value else True
    parameters["additional_parameters"] = extra
    return parameters


class SlurmScheduler:
    name = "slurm"
    task_dependencies = True

    def __init__(self) -> None:
        self.calls = 0

    def _run(self, argv: list[str]) -> str:
        self.calls += 1
        return command_output(argv)

    @staticmethod
    def dependency_id(job_id: str) -> str:
        """Slurm waits on single array tasks (``123_4``) as on jobs: every id names itself."""
        return job_id

    def executor(self, folder: Path, resources: dict[str, Any], after: list[str], job_name: str) -> submitit.Executor:
        if shutil.which("sbatch") is None:
            raise BackendError("slurm backend: 'sbatch' not found on PATH; run on a Slurm login node or use --backend local")
        self.calls += 1  # the array's one sbatch
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=10)
        parameters = sbatch_parameters(resources)
        if after:
            parameters["dependency"] = dependency_option(after)
        # srun (submitit's default) is kept: the time-limit signal (USR2) goes to job steps, and
        # submitit's handler in the step is what checkpoints and requeues the stage.
        executor.update_parameters(job_name=job_name, **parameters)
        return executor

    def set_task_dependencies(self, waits: dict[str, list[str]]) -> list[str]:
        """Gives each queued job (array task) in ``waits`` exactly that ``afterany`` list, ``[]`` clearing it.

        All updates go to one ``scontrol`` reading them from stdin (its interactive mode): one process
        for any number of tasks. Returns Slurm's messages for the updates it refused, less those for
        tasks that had already started; a refused task keeps its array's wider wait, which is slower,
        never wrong.
        """
        if not waits:
            return []
        lines = "".join(f"update JobId={job_id} Dependency={dependency_option(after)}\n" for job_id, after in waits.items())
        self.calls += 1
        try:
            finished = run_command(["scontrol"], stdin=lines)
        except BackendError as error:
            return [str(error)]
        if finished.returncode == 0:
            return []
        problems = [line.strip() for line in finished.stderr.splitlines() if line.strip()]
        problems = [line for line in problems if not any(started in line for started in TASK_STARTED)]
        if not problems and not finished.stderr.strip():
            problems = [f"scontrol exited with status {finished.returncode}"]
        return problems

    def live_jobs(self, job_ids: list[str]) -> dict[str, str]:
        """State of each given job still known to squeue (array tasks one per line); others are absent.

        Lists this user's jobs rather than ``--jobs=...``: squeue refuses the whole query when one
        id has already left the queue.
        """
        if not job_ids:
            return {}
        output = self._run(["squeue", "--noheader", "--array", "--format=%i %T", f"--user={getpass.getuser()}"])
        wanted = set(job_ids)
        states = {}
        for line in output.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] in wanted:
                states[parts[0]] = parts[1]
        return states

    def cancel(self, job_ids: list[str]) -> None:
        if job_ids:
            self._run(["scancel", *job_ids])
