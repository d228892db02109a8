"""Submitting a plan to a batch scheduler (Slurm, PBS): job arrays, dependencies, idempotence.

The rules, each with its reason:

* **One array per stage kind and resource shape.** A sweep of 200 students is one ``sbatch``, not
  200; schedulers and their users both prefer that.
* **Dependencies are ``afterany`` on the upstream jobs, and each stage checks its own upstream
  DONE markers when it starts.** ``afterok`` would let one failed teacher cancel the students of
  every other teacher sharing their array's dependency list. With ``afterany`` the students of a
  failed teacher start, find their teacher's DONE marker missing, and fail at once with a message
  naming it; the students of the other teachers run as usual. The DONE check also makes any wait
  that is too wide harmless: it is slower, never wrong.
* **Each stage waits only on its own upstream jobs.** A vanilla student needs no teacher, a kd
  student only its own, an evaluate only its own student and teacher. Where the scheduler can give
  one array task its own dependencies (Slurm: ``scontrol update JobId=<array>_<i> Dependency=...``
  on a pending task), the array goes out waiting on the union of its tasks' upstream jobs, and then
  every task whose own set is narrower is updated, all in one ``scontrol`` process: two commands
  per array whatever its size, and a submit killed between the two leaves tasks that wait too
  long, never too short. Where it cannot (PBS Pro and Torque document dependencies on jobs and
  whole arrays only), a task waits on its upstream *arrays*, and a kind's stages split into one
  array per distinct set of upstream arrays (vanilla students, waiting on nothing, go apart from
  kd students, waiting on the teacher array): 6 qsub for the sweep below.
  Measured with ``bench/submit.py`` (200 experiments: 4 teachers, vanilla and kd, 333 stages; fake
  stage jobs, one teacher sleeping 30 s; the two-CPU test cluster; vanilla start = seconds after
  the submit began, median / max, partly a wait for one of the two CPUs in every design)::

      design                          commands  arrays  submit s  all DONE s  vanilla start s
      union only (before)                    3       3      0.3       227       39.5 / 45.6
      (a) one array per upstream set       210     210      5.5       183       14.6 / 26.7
      (b) held, task updates, release        6       3      0.7       184       74.9 / 80.9
      union, then task updates (chosen)      5       3      2.2       181       14.7 / 25.8

  (a) is as fast but costs one sbatch per evaluate and grows with the sweep. (b) sends one command
  more, its released tasks started late in the measurement (the vanilla students 75 s in), and a
  submit killed before the release leaves held arrays that never run and that the next submit
  skips as still queued. The union the chosen design submits first is already a correct wait, so
  it needs no hold.
* **Idempotent.** A stage that is DONE on disk, or whose recorded job is still queued or running,
  is not submitted again; a failed one is, with its dependants (queued ones are cancelled and
  resubmitted, since they wait on the failed job, not on its replacement). The submit lock keeps two submits
  of one sweep from interleaving, and the manifest is rewritten after every array, so a killed
  submit leaves a manifest that says exactly which arrays went out.
* **Across sweeps too.** Stage folders are shared by hash, so a stage another sweep under the same
  root has queued (its manifest says so) or a live runner holds (its lease says so) is not
  submitted again; this sweep's dependants wait on that job. Two submits racing past this check
  both send the stage, and the second job to start finds the first's lease and stands aside.
* **Refusals roll back.** If the scheduler refuses an array (unknown partition, too many GPUs),
  the arrays this call already submitted are cancelled, the manifest records the refused array's
  stages as ``refused`` and the call's other stages as ``rolled back``, each with the scheduler's
  reason, the call's folder of submitit files is removed, and one error line names the refusal.
  submitit prints a failed sbatch's stderr before raising (its ``CommandFunction``); that print is
  captured, since the same text is already in the error.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import submitit

from pipeline.backends import LIVE_STATES, BackendError
from pipeline.leases import live_lease
from pipeline.manifest import Manifest
from pipeline.plan import Plan, StageSpec
from pipeline.pending import stages_to_run
from pipeline.store import CorruptFileError, StageFolders
from pipeline.sweep_schema import STAGE_KINDS


class Scheduler(Protocol):
    """What the cluster backend needs from one scheduler; ``calls`` counts commands sent to it.

    ``task_dependencies`` says whether a queued array task can be given its own dependencies after
    submission; ``set_task_dependencies`` is called, and needed, only where it is true.
    """

    name: str
    calls: int
    task_dependencies: bool

    def dependency_id(self, job_id: str) -> str: ...

    def executor(self, folder: Path, resources: dict[str, Any], after: list[str], job_name: str) -> submitit.Executor: ...

    def set_task_dependencies(self, waits: dict[str, list[str]]) -> list[str]: ...

    def live_jobs(self, job_ids: list[str]) -> dict[str, str]: ...

    def cancel(self, job_ids: list[str]) -> None: ...


@dataclass
class SubmitSummary:
    submitted: dict[str, str] = field(default_factory=dict)  # stage -> job id
    skipped_done: list[str] = field(default_factory=list)
    skipped_live: dict[str, str] = field(default_factory=dict)  # stage -> job id still queued/running
    skipped_elsewhere: dict[str, str] = field(default_factory=dict)  # stage -> who runs it (another sweep's job, a lease)
    arrays: int = 0


def resource_key(resources: dict[str, Any]) -> str:
    return json.dumps(resources, sort_keys=True)


def array_groups(stages: list[StageSpec]) -> list[list[StageSpec]]:
    """Stages split by (kind, resources), in an order where every upstream kind comes first."""
    groups: dict[tuple[int, str], list[StageSpec]] = {}
    for spec in stages:
        groups.setdefault((STAGE_KINDS.index(spec.kind), resource_key(spec.resources)), []).append(spec)
    return [groups[key] for key in sorted(groups)]


def split_by_waits(group: list[StageSpec], waits: dict[str, list[str]]) -> list[list[StageSpec]]:
    """``group`` as one array per distinct set of waits, in the order the sets first appear."""
    arrays: dict[tuple[str, ...], list[StageSpec]] = {}
    for spec in group:
        arrays.setdefault(tuple(waits[spec.name]), []).append(spec)
    return list(arrays.values())


def one_line(text: str) -> str:
    return " ".join(text.split())


class ClusterBackend:
    def __init__(
        self, scheduler: Scheduler, root: Path, jobs_dir: Path, job: Callable[..., Any], report: Callable[[str], None] = print
    ):
        self.scheduler = scheduler
        self.root = root
        self.jobs_dir = jobs_dir
        self.job = job
        self.report = report

    def submit(self, plan: Plan, to_run: dict[str, str] | None = None) -> SubmitSummary:
        """Submits every stage of ``to_run`` (default: ``pipeline.pending.stages_to_run``) that is not
        still queued or running, for this sweep or any other; call it under the submit lock."""
        to_run = stages_to_run(plan, self.root) if to_run is None else to_run
        manifest = Manifest.load(self.jobs_dir)
        summary = SubmitSummary()
        recorded = {
            name: entry["job_id"] for name, entry in manifest.stages.items()
            if entry.get("backend") == self.scheduler.name and entry.get("job_id") and name in plan.stages
        }
        pending = [name for name in plan.stages if name in to_run]
        others = self._held_by_other_sweeps(pending)
        leases = {name: lease for name in pending if (lease := live_lease(StageFolders(self.root, name).logs)) is not None}
        asked = {recorded[name] for name in pending if name in recorded} | {job for job, _ in others.values()}
        asked |= {lease.job_id for lease in leases.values() if lease.job_id}
        live = self.scheduler.live_jobs(sorted(asked)) if asked else {}
        to_submit, resubmitted, stale = [], set(), []
        held_job: dict[str, str] = {}  # stage -> another sweep's (or runner's) live job its dependants wait on
        for name, spec in plan.stages.items():  # plan order: upstream stages come first
            if name not in pending:
                summary.skipped_done.append(name)
            elif live.get(recorded.get(name, ""), "") in LIVE_STATES and resubmitted.isdisjoint(spec.upstream.values()):
                summary.skipped_live[name] = recorded[name]
            elif (holder := self._live_holder(name, others, leases, live)) is not None:
                job_id, who = holder
                summary.skipped_elsewhere[name] = who
                if job_id:
                    held_job[name] = job_id
                manifest.stages[name] = {
                    "kind": spec.kind, "backend": self.scheduler.name, "state": "elsewhere", "held_by": who,
                    **({"held_by_job": job_id} if job_id else {}),
                }
            elif to_run[name] == "not built" and resubmitted.isdisjoint(spec.upstream.values()) \
                    and StageFolders(self.root, name).is_done():
                # Its job finished after ``to_run`` was worked out, so the scheduler no longer lists it:
                # DONE is written before a job ends, so looking again after asking the scheduler
                # closes that window (another sweep's teacher must not train twice).
                summary.skipped_done.append(name)
            else:
                # A queued stage whose upstream goes out again waits on the old job: replace it too.
                if live.get(recorded.get(name, ""), "") in LIVE_STATES:
                    stale.append(recorded[name])
                to_submit.append(spec)
                resubmitted.add(name)
        if stale:
            self.scheduler.cancel(stale)
        if summary.skipped_elsewhere:
            manifest.save()
        job_of = {**{name: recorded[name] for name in summary.skipped_live}, **held_job}
        folder = self._call_folder()
        for group in array_groups(to_submit):
            waits = {spec.name: self._waits(spec, job_of) for spec in group}
            arrays = [group] if self.scheduler.task_dependencies else split_by_waits(group, waits)
            for array in arrays:
                after = sorted({job_id for spec in array for job_id in waits[spec.name]})
                jobs = self._submit_array(array, after, folder, plan.sweep_name, manifest, summary, to_submit)
                summary.arrays += 1
                for spec, job in zip(array, jobs):
                    job_of[spec.name] = job.job_id
                    summary.submitted[spec.name] = job.job_id
                    manifest.stages[spec.name] = {
                        "kind": spec.kind, "backend": self.scheduler.name, "job_id": job.job_id, "state": "submitted",
                        "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr),
                        "after": waits[spec.name], "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    }
                manifest.save()  # one atomic write per array, before its tasks are narrowed
                narrower = {job.job_id: waits[spec.name] for spec, job in zip(array, jobs) if waits[spec.name] != after}
                if narrower:
                    problems = self.scheduler.set_task_dependencies(narrower)
                    if problems:
                        tasks = f"{len(problems)} {array[0].kind} task(s)"
                        self.report(f"{self.scheduler.name}: {tasks} keep their array's wider wait: {problems[0]}")
        return summary

    def _held_by_other_sweeps(self, names: list[str]) -> dict[str, tuple[str, str]]:
        """Stage -> (job id, sweep) for the jobs other sweeps under this root recorded for ``names``.

        Stage folders are shared by hash, so another sweep may have queued the very stage this one
        needs; its manifest is the only place that says so before the job starts and takes a lease.
        """
        wanted = set(names)
        found: dict[str, tuple[str, str]] = {}
        for path in sorted(self.jobs_dir.parent.glob("*/manifest.json")):
            if path.parent.resolve() == self.jobs_dir.resolve():
                continue
            try:
                stages = Manifest.load(path.parent).stages
            except CorruptFileError:
                continue
            for name, entry in stages.items():
                if name in wanted and entry.get("backend") == self.scheduler.name and entry.get("job_id"):
                    found.setdefault(name, (str(entry["job_id"]), path.parent.name))
        return found

    @staticmethod
    def _live_holder(
        name: str, others: dict[str, tuple[str, str]], leases: dict[str, Any], live: dict[str, str]
    ) -> tuple[str | None, str] | None:
        """(job id to wait on or None, who) when someone else queued or runs the stage, else None."""
        if name in others and live.get(others[name][0], "") in LIVE_STATES:
            job_id, sweep = others[name]
            return job_id, f"sweep {sweep}, job {job_id}"
        lease = leases.get(name)
        if lease is not None:
            job_id = lease.job_id if live.get(lease.job_id or "", "") in LIVE_STATES else None
            return job_id, lease.describe()
        return None

    def _waits(self, spec: StageSpec, job_of: dict[str, str]) -> list[str]:
        """What the stage's job waits on: its upstream stages' jobs as the scheduler names them (none for DONE ones)."""
        return sorted({self.scheduler.dependency_id(job_of[up]) for up in spec.upstream.values() if up in job_of})

    def _call_folder(self) -> Path:
        """This call's folder for submitit's files, ``<backend>/<submit time>``; made by submitit when it writes."""
        base = self.jobs_dir / self.scheduler.name
        stamp = time.strftime("%Y%m%d-%H%M%S")
        folder, number = base / stamp, 1
        while folder.exists():  # a call of the same second (the submit lock makes calls one at a time)
            number += 1
            folder = base / f"{stamp}-{number}"
        return folder

    def _submit_array(
        self, array: list[StageSpec], after: list[str], folder: Path, sweep: str,
        manifest: Manifest, summary: SubmitSummary, to_submit: list[StageSpec],
    ) -> list[Any]:
        """Submits one array; a refusal rolls back the whole call and raises its one-line BackendError."""
        kind = array[0].kind
        executor = self.scheduler.executor(folder / "%j", dict(array[0].resources), after, f"{sweep}-{kind}")
        printed = io.StringIO()
        try:
            with contextlib.redirect_stderr(printed), executor.batch():
                jobs = [executor.submit(self.job, spec.to_dict(), str(self.root)) for spec in array]
        except Exception as error:  # submitit wraps the scheduler's refusal in its own error types
            reason = one_line(str(error)) or one_line(printed.getvalue()) or type(error).__name__
            self._roll_back(manifest, summary, to_submit, array, reason, folder, sweep)
            raise BackendError(f"{self.scheduler.name} refused the {kind} array: {reason}") from None
        return jobs

    def _roll_back(
        self, manifest: Manifest, summary: SubmitSummary, to_submit: list[StageSpec], refused: list[StageSpec],
        reason: str, folder: Path, sweep: str,
    ) -> None:
        """Cancels this call's jobs, records why each of its stages is not queued, removes its files."""
        submitted = list(summary.submitted.values())
        if submitted:
            self.scheduler.cancel(submitted)
        refused_names = {spec.name for spec in refused}
        for spec in to_submit:
            entry = {"kind": spec.kind, "backend": self.scheduler.name, "reason": reason}
            if spec.name in refused_names:
                entry["state"] = "refused"
            else:
                entry.update(state="rolled back", refused_array=refused[0].kind)
                if spec.name in summary.submitted:
                    entry["job_id"] = summary.submitted[spec.name]
            manifest.stages[spec.name] = entry
        manifest.save()
        shutil.rmtree(folder, ignore_errors=True)  # submitit's pickles and submission scripts of this call
        if submitted:
            self.report(f"rolled back {len(submitted)} job(s) of sweep {sweep} submitted before the refusal")
