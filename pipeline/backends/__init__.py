"""Backends run a plan's stages: ``local`` (submitit's LocalExecutor on this machine), ``slurm``
(submitit's SlurmExecutor) and ``pbs`` (our executor on submitit's core).

The cluster ones share ``cluster.ClusterBackend`` and differ only in their ``Scheduler``; these
functions pick one by name, so the CLI and status code never branch on the scheduler.
"""
from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.backends.cluster import Scheduler

BACKENDS = ("local", "slurm", "pbs")
LIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "HELD", "QUEUED")
"""Scheduler states of a job that is still queued or running (Slurm's names; PBS maps onto them)."""


class BackendError(RuntimeError):
    """The scheduler is missing or refused a submission; one line naming the backend and the cause.

    Defined here, apart from the submitit-based modules, so the CLI can catch it without
    importing the job machinery in commands that only read files.
    """


def cluster_scheduler(name: str) -> "Scheduler":
    if name == "slurm":
        from pipeline.backends.slurm import SlurmScheduler

        return SlurmScheduler()
    if name == "pbs":
        from pipeline.backends.pbs import PBSScheduler

        return PBSScheduler()
    raise ValueError(f"no cluster scheduler {name!r}; allowed: slurm, pbs")


def live_jobs(backend: str, job_ids: list[str]) -> dict[str, str]:
    """Jobs of ``backend`` still queued or running, with their scheduler state."""
    if backend == "local":
        return local_live_jobs(job_ids)
    return cluster_scheduler(backend).live_jobs(job_ids)


def local_live_jobs(job_ids: list[str]) -> dict[str, str]:
    """Local jobs are processes of this machine (submitit's job id is the pid): alive means running."""
    states = {}
    for job_id in job_ids:
        try:
            os.kill(int(job_id), 0)
        except (ProcessLookupError, ValueError):
            continue
        except PermissionError:
            pass
        states[job_id] = "RUNNING"
    return states


def cancel_jobs(backend: str, job_ids: list[str]) -> None:
    if backend == "local":
        # SIGINT, as submitit's own LocalJob.cancel: the job controller then stops its task
        # (the task itself ignores SIGTERM, which submitit reserves for requeueing).
        for job_id in job_ids:
            try:
                os.kill(int(job_id), signal.SIGINT)
            except ProcessLookupError:
                pass
        return
    cluster_scheduler(backend).cancel(job_ids)
