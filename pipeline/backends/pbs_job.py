"""The job side of the PBS backend: the job environment, and the entry point the batch script runs.

submitit finds ``PBSJobEnvironment`` through the ``submitit`` entry points (pyproject.toml) once the
script has exported ``SUBMITIT_EXECUTOR=pbs``. Ids are read from what the scheduler sets:

* ``PBS_JOBID``: ``123.server`` or, in a subjob, ``123[4].server``; only the sequence number is kept.
* the array index: ``PBS_ARRAY_INDEX`` (PBS Pro, and Slurm with spank_pbs) or ``PBS_ARRAYID`` (Torque).
* the array's own id: ``PBS_ARRAY_ID`` where set (PBS Pro, spank_pbs), else the sequence of ``PBS_JOBID``.

Behind Slurm's Torque wrappers without spank_pbs no ``PBS_*`` variable is set, and with spank_pbs
``PBS_JOBID`` is the task's own Slurm id rather than the array's; the ``SLURM_ARRAY_*`` and
``SLURM_JOB_ID`` variables are read there instead, so the ids still match what qsub printed.
"""
from __future__ import annotations

import os
import sys

from submitit.core import submission, utils
from submitit.core.job_environment import JobEnvironment

from pipeline.backends.pbs_scripts import split_job_id

ARRAY_INDEX_VARIABLES = ("PBS_ARRAY_INDEX", "PBS_ARRAYID", "SLURM_ARRAY_TASK_ID")


def _sequence(value: str | None) -> str | None:
    return split_job_id(value)[0] if value else None


class PBSJobEnvironment(JobEnvironment):
    """One task on one node: rank 0 of 1, as the PBS backend submits it."""

    _env = {
        "job_id": "PBS_JOBID",
        "array_job_id": "PBS_ARRAY_ID",
        "array_task_id": "PBS_ARRAY_INDEX",
    }

    @property
    def raw_job_id(self) -> str:
        raw = _sequence(os.environ.get("PBS_JOBID")) or os.environ.get("SLURM_JOB_ID")
        if raw is None:
            raise RuntimeError("pbs backend: neither PBS_JOBID nor SLURM_JOB_ID is set; is this a PBS job?")
        return raw

    @property
    def array_task_id(self) -> str | None:
        return next((os.environ[name] for name in ARRAY_INDEX_VARIABLES if os.environ.get(name)), None)

    @property
    def array_job_id(self) -> str | None:
        if self.array_task_id is None:
            return None
        if os.environ.get("SLURM_ARRAY_JOB_ID"):
            return os.environ["SLURM_ARRAY_JOB_ID"]
        return _sequence(os.environ.get("PBS_ARRAY_ID")) or self.raw_job_id

    @property
    def num_tasks(self) -> int:
        return 1

    @property
    def num_nodes(self) -> int:
        return 1

    @property
    def node(self) -> int:
        return 0

    @property
    def global_rank(self) -> int:
        return 0

    @property
    def local_rank(self) -> int:
        return 0


def redirect_output(folder: str) -> None:
    """Points this process's stdout and stderr at submitit's log files for this job (appending, as a
    requeued job adds to them), so ``job.stdout()`` works on every PBS flavour."""
    paths = utils.JobPaths(folder, job_id=PBSJobEnvironment().job_id, task_id=0)
    paths.folder.mkdir(parents=True, exist_ok=True)
    for stream, path in ((sys.stdout, paths.stdout), (sys.stderr, paths.stderr)):
        stream.flush()
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(descriptor, stream.fileno())
        os.close(descriptor)


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m pipeline.backends.pbs_job FOLDER")
    redirect_output(sys.argv[1])
    submission.process_job(sys.argv[1])


if __name__ == "__main__":
    main()
