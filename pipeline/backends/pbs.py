"""PBS Pro and Torque through submitit: ``PBSExecutor`` submits with qsub, ``PBSJob`` follows with qstat.

submitit has no PBS support; this plugs into its core the way its own SlurmExecutor does
(``PicklingExecutor`` for the pickles, ``InfoWatcher`` for batched state queries) and registers
``PBSExecutor`` and ``PBSJobEnvironment`` through the ``submitit`` entry points in pyproject.toml.

    executor = PBSExecutor("jobs/%j", dialect="pro")          # or dialect="torque"
    executor.update_parameters(cpus_per_task=4, gpus_per_node=1, mem_gb=16, timeout_min=120,
                               queue="gpu", account="proj", dependency=["101", "102[]"],
                               dependency_type="afterany")            # job 101 and all of array 102
    with executor.batch():                                    # 2 or more submissions: one qsub array
        jobs = [executor.submit(train, config) for config in configs]
    jobs[0].state                                             # PENDING, RUNNING, COMPLETED, FAILED...

State: submitit's result file wins (it is written by every job that got to run Python, success or
error); otherwise ``qstat -f`` (``-x`` on PBS Pro). A job that qstat listed before and has since
forgotten (Torque drops finished jobs) without leaving a result file is FAILED; one qstat has never
listed is UNKNOWN until its result file appears (array tasks behind Slurm's wrappers are never listed).

Every scheduler command goes through ``run_command``, the one place that starts a process.
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
import typing as tp
import uuid
from pathlib import Path

from submitit.core import core, logger, utils

from pipeline.backends import BackendError
from pipeline.backends import pbs_scripts as scripts
from pipeline.backends.pbs_job import PBSJobEnvironment
from pipeline.backends.slurm import SlurmScheduler
from pipeline.sweep_schema import rank_count

__all__ = [
    "PBSCommandMissing", "PBSError", "PBSExecutor", "PBSJob", "PBSJobEnvironment", "PBSScheduler", "TorqueJob",
    "cancel_jobs", "job_states", "run_command", "slurm_wrappers_installed",
]


class PBSError(BackendError):
    """A PBS command failed; the message is one line naming the backend, the command and its output."""


class PBSCommandMissing(PBSError):
    """qsub, qstat or qdel is not on PATH: not a PBS login node (or the wrong PATH)."""


def run_command(argv: list[str], accept: tuple[int, ...] = (0,)) -> str:
    """Runs one scheduler command and returns its stdout; exit statuses outside ``accept`` raise PBSError."""
    if shutil.which(argv[0]) is None:
        raise PBSCommandMissing(f"pbs backend: '{argv[0]}' not found on PATH; run on a PBS or Torque login node")
    finished = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if finished.returncode not in accept:
        message = " ".join(f"{finished.stderr} {finished.stdout}".split()) or "no message"
        raise PBSError(f"pbs backend: {argv[0]} failed (exit {finished.returncode}): {message}")
    return finished.stdout


def job_states(job_ids: list[str], dialect: str) -> dict[str, str]:
    """State of each job qstat still lists, by submitit id (``123``, ``123_4``); forgotten ones are absent."""
    if not job_ids:
        return {}
    output = run_command(scripts.qstat_argv(scripts.check_dialect(dialect), job_ids), accept=(0, scripts.UNKNOWN_JOB_EXIT))
    return {job_id: scripts.state_of(record) for job_id, record in scripts.parse_qstat_full(output).items()}


def cancel_jobs(job_ids: list[str]) -> None:
    if job_ids:
        run_command(scripts.qdel_argv(job_ids))


def slurm_wrappers_installed() -> bool:
    """Whether ``qsub`` is Slurm's Torque wrapper (a Perl script over sbatch) rather than a PBS client."""
    qsub = shutil.which("qsub")
    if qsub is None:
        return False
    with open(qsub, "rb") as head:
        return b"Slurm" in head.read(4096)


class PBSInfoWatcher(core.InfoWatcher):
    """One ``qstat -f`` for all unfinished jobs of a dialect, at submitit's polling pace."""

    def __init__(self, dialect: str, delay_s: int = 60) -> None:
        super().__init__(delay_s)
        self.dialect = scripts.check_dialect(dialect)
        self._listed: set[str] = set()

    def _make_command(self) -> list[str] | None:
        unfinished = sorted(self._registered - self._finished)
        return scripts.qstat_argv(self.dialect, unfinished) if unfinished else None

    def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
        text = string.decode() if isinstance(string, bytes) else string
        records = scripts.parse_qstat_full(text)
        for record in records.values():
            record["State"] = scripts.state_of(record)
        return records

    def get_state(self, job_id: str, mode: str = "standard") -> str:
        return self.get_info(job_id, mode=mode).get("State") or "UNKNOWN"

    def update(self) -> None:
        """As submitit's, but through ``run_command``, reading past qstat's "unknown job" exit status."""
        command = self._make_command()
        if command is None:
            return
        asked = self._registered - self._finished
        self._num_calls += 1
        try:
            output = run_command(command, accept=(0, scripts.UNKNOWN_JOB_EXIT))
        except PBSCommandMissing:
            raise
        except PBSError as error:
            logger.get_logger().warning(f"{error}; job states may be out of date")
        else:
            records = self.read_info(output)
            self._listed |= set(records)
            for job_id in asked - set(records):
                if job_id in self._listed:
                    records[job_id] = {"State": "FAILED", "reason": "left qstat without a result file"}
            self._info_dict.update(records)
        self._last_status_check = time.time()
        for job_id in self._registered - self._finished:
            if self.is_done(job_id, mode="cache"):
                self._finished.add(job_id)


class PBSJob(core.Job[core.R]):
    """A PBS Pro job or array task (``123`` or ``123_4``)."""

    watcher = PBSInfoWatcher("pro")
    _outcome: str | None = None

    @property
    def state(self) -> str:
        return self._result_state() or self.watcher.get_state(self.job_id, mode="standard")

    def _result_state(self) -> str | None:
        """COMPLETED or FAILED from submitit's result file (read once), or None while there is none."""
        if self._outcome is None and self.paths.result_pickle.exists():
            outcome, _ = utils.pickle_load(self.paths.result_pickle)
            self._outcome = "COMPLETED" if outcome == "success" else "FAILED"
        return self._outcome

    def cancel(self, check: bool = True) -> None:
        try:
            cancel_jobs([self.job_id])
        except PBSError:
            if check:
                raise


class TorqueJob(PBSJob[core.R]):
    """A Torque job (or one submitted through Slurm's Torque wrappers): ``qstat -f`` without ``-x``."""

    watcher = PBSInfoWatcher("torque")


class PBSExecutor(core.PicklingExecutor):
    """Submits to PBS Pro (``dialect="pro"``) or Torque (``dialect="torque"``).

    Parameters of ``update_parameters`` are the fields of ``pbs_scripts.PBSRequest``: job_name,
    timeout_min, cpus_per_task, gpus_per_node, mem_gb, queue, account, dependency (job ids; a subjob
    ``123_4`` stands for its whole array ``123[]``, see ``pbs_scripts.dependency_line``), dependency_type
    (afterok | afterany), setup (shell lines run before Python), directives (extra ``#PBS`` lines). One
    task on one node per job. ``slurm_wrappers=True`` when qsub is Slurm's Torque wrapper: dependencies
    are then written with Slurm's ids (``123`` for a whole array), as sbatch reads them.
    """

    job_class: tp.Type[core.Job[tp.Any]] = PBSJob

    def __init__(
        self,
        folder: str | Path,
        dialect: str = "pro",
        max_num_timeout: int = 3,
        max_pickle_size_gb: float = 1.0,
        python: str | None = None,
        slurm_wrappers: bool = False,
    ) -> None:
        super().__init__(folder, max_num_timeout=max_num_timeout, max_pickle_size_gb=max_pickle_size_gb)
        self.dialect = scripts.check_dialect(dialect)
        self.job_class = PBSJob if dialect == "pro" else TorqueJob
        self.python = shlex.quote(sys.executable) if python is None else python
        self.slurm_wrappers = slurm_wrappers
        self._array_size: int | None = None

    @classmethod
    def _equivalence_dict(cls) -> core.EquivalenceDict:
        return {
            "name": "job_name",
            "timeout_min": "timeout_min",
            "mem_gb": "mem_gb",
            "nodes": "nodes",
            "cpus_per_task": "cpus_per_task",
            "gpus_per_node": "gpus_per_node",
            "tasks_per_node": "tasks_per_node",
        }

    @classmethod
    def _valid_parameters(cls) -> set[str]:
        return set(scripts.PARAMETERS)

    def _internal_update_parameters(self, **kwargs: tp.Any) -> None:
        scripts.make_request({**self.parameters, **kwargs})  # fails here, not at submission
        super()._internal_update_parameters(**kwargs)

    @classmethod
    def affinity(cls) -> int:
        """Available where qsub is; below Slurm where both are (Slurm's Torque wrappers)."""
        if shutil.which("qsub") is None:
            return -1
        return 1 if shutil.which("srun") else 2

    def _internal_process_submissions(
        self, delayed_submissions: list[utils.DelayedSubmission]
    ) -> list[core.Job[tp.Any]]:
        """One submission is one job; several are one qsub array whose task ``i`` runs submission ``i``."""
        if len(delayed_submissions) == 1:
            return super()._internal_process_submissions(delayed_submissions)
        folder = utils.JobPaths.get_first_id_independent_folder(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        timeout_min = self.parameters.get("timeout_min", scripts.PBSRequest.timeout_min)
        pickles = []
        for delayed in delayed_submissions:
            path = folder / f"{uuid.uuid4().hex}.pkl"
            delayed.set_timeout(timeout_min, self.max_num_timeout)
            delayed.dump(path)
            pickles.append(path)
        array = PBSExecutor(self.folder, self.dialect, self.max_num_timeout, self.max_pickle_size_gb, self.python, self.slurm_wrappers)
        array.parameters = dict(self.parameters)
        array._array_size = len(delayed_submissions)
        self._throttle()
        array_id, script = array._qsub(self._submitit_command_str)
        jobs: list[core.Job[tp.Any]] = [self.job_class(self.folder, f"{array_id}_{index}") for index in range(len(pickles))]
        jobs[0].paths.move_temporary_file(script, "submission_file", keep_as_symlink=True)
        for job, path in zip(jobs, pickles):
            job.paths.move_temporary_file(path, "submitted_pickle")
        return jobs

    @property
    def _submitit_command_str(self) -> str:
        return scripts.shell_command(self.python, self.folder)

    def _num_tasks(self) -> int:
        return 1

    def _make_submission_file_text(self, command: str, uid: str) -> str:
        request = scripts.make_request(self.parameters)
        return scripts.submission_script(request, self.dialect, command, self._array_size, self.slurm_wrappers)

    def _make_submission_command(self, submission_file_path: Path) -> list[str]:
        uid = submission_file_path.stem.rsplit("_", 1)[-1]
        stdout, stderr = scripts.scheduler_log_paths(
            submission_file_path.parent, uid, self.dialect, self._array_size is not None, self.slurm_wrappers
        )
        return scripts.qsub_argv(submission_file_path, stdout, stderr)

    @staticmethod
    def _get_job_id_from_submission_command(string: bytes | str) -> str:
        text = string.decode() if isinstance(string, bytes) else string
        try:
            return scripts.job_id_from_qsub(text)
        except ValueError as error:
            raise PBSError(str(error)) from None

    def _submit_command(self, command: str) -> core.Job[tp.Any]:
        job_id, script = self._qsub(command)
        job = self.job_class(folder=self.folder, job_id=job_id)
        job.paths.move_temporary_file(script, "submission_file", keep_as_symlink=True)
        return job

    def _qsub(self, command: str) -> tuple[str, Path]:
        """Writes the script and submits it through ``run_command``: (submitit id, script path).

        For an array this is the array's id; its tasks are the jobs, the array itself is never polled.
        """
        uid = uuid.uuid4().hex
        folder = utils.JobPaths.get_first_id_independent_folder(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        script = folder / f".submission_file_{uid}.sh"
        script.write_text(self._make_submission_file_text(command, uid))
        output = run_command(self._make_submission_command(script))
        return self._get_job_id_from_submission_command(output), script


class PBSScheduler:
    """The cluster backend's view of PBS (see cluster.Scheduler): one executor per array, qstat, qdel.

    A sweep's resources map to ``update_parameters``: time_min, cpus, gpus, mem_gb, queue, account;
    ``pbs_dialect`` picks the dialect (default pro); Slurm-only keys (partition, qos, constraint,
    extra_sbatch) are not PBS requests and are left out. Upstream jobs are ``afterany`` dependencies on
    whole jobs and arrays, the only ones PBS Pro and Torque document; a subjob cannot be given its own
    dependencies after submission, so the backend splits a kind's stages by the arrays they wait on.
    """

    name = "pbs"
    task_dependencies = False

    def __init__(self, slurm_wrappers: bool | None = None) -> None:
        self.calls = 0
        self.slurm_wrappers = slurm_wrappers_installed() if slurm_wrappers is None else slurm_wrappers

    @staticmethod
    def dependency_id(job_id: str) -> str:
        """``123`` for a job, ``123[]`` for a subjob's whole array: what a PBS dependency can name."""
        return scripts.whole_array(job_id)

    def executor(self, folder: Path, resources: dict[str, tp.Any], after: list[str], job_name: str) -> PBSExecutor:
        if shutil.which("qsub") is None:
            raise PBSCommandMissing("pbs backend: 'qsub' not found on PATH; run on a PBS or Torque login node")
        if rank_count(resources) > 1:
            raise BackendError(f"pbs backend: {job_name} asks for {rank_count(resources)} ranks (tasks x nodes); "
                                    "several ranks per stage run on the local and slurm backends only, for now")
        self.calls += 1  # the array's one qsub
        executor = PBSExecutor(folder, dialect=resources.get("pbs_dialect") or "pro", max_num_timeout=10,
                               slurm_wrappers=self.slurm_wrappers)
        parameters: dict[str, tp.Any] = {
            "job_name": job_name,
            "timeout_min": int(resources.get("time_min", 60)),
            "cpus_per_task": int(resources.get("cpus", 1)),
            "gpus_per_node": int(resources.get("gpus", 0)),
            "mem_gb": float(resources.get("mem_gb", 4)),
        }
        for key in ("queue", "account"):
            if resources.get(key):
                parameters[key] = resources[key]
        if after:
            parameters.update(dependency=list(after), dependency_type="afterany")
        executor.update_parameters(**parameters)
        return executor

    def live_jobs(self, job_ids: list[str]) -> dict[str, str]:
        """State of each given job qstat still lists (plain ``qstat -f``: finished jobs are not wanted).

        Under Slurm's Torque wrappers, Slurm itself is underneath and the wrapper qstat cannot
        address array tasks, so the queue is read from squeue there instead.
        """
        if not job_ids:
            return {}
        self.calls += 1
        if self.slurm_wrappers:
            return SlurmScheduler().live_jobs(job_ids)
        return job_states(job_ids, "torque")  # no -x, whatever the dialect: finished jobs are not live

    def cancel(self, job_ids: list[str]) -> None:
        """qdel; under Slurm's wrappers scancel, since their qdel of one task cancels the whole array."""
        if job_ids:
            self.calls += 1
            if self.slurm_wrappers:
                SlurmScheduler().cancel(job_ids)
            else:
                cancel_jobs(job_ids)
