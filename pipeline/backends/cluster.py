"""Submitting a plan to a batch scheduler (Slurm, PBS): job arrays, dependencies, idempotence.

The rules, each with its reason:

* **One array per stage kind and resource shape.** A sweep of 200 students is one ``sbatch``, not
  200; schedulers and their users both prefer that.
* **Dependencies are ``afterany`` on the upstream tasks, and each stage checks its own upstream
  DONE markers when it starts.** An array shares one dependency list, so ``afterok`` would let one
  failed teacher cancel the students of every other teacher in the array. With ``afterany`` the
  students of a failed teacher start, find their teacher's DONE marker missing, and fail at once
  with a message naming it; the students of the other teachers run as usual.
* **Idempotent.** A stage that is DONE on disk, or whose recorded job is still queued or running,
  is not submitted again; a failed one is, with its dependants (queued ones are cancelled and
  resubmitted, since they wait on the failed job, not on its replacement). The submit lock keeps two submits
  of one sweep from interleaving, and the manifest is rewritten after every array, so a killed
  submit leaves a manifest that says exactly which arrays went out.
* **Refusals roll back.** If the scheduler refuses an array (unknown partition, too many GPUs),
  the arrays this call already submitted are cancelled before the one-line error is raised.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import submitit

from pipeline.backends import LIVE_STATES, BackendError
from pipeline.manifest import Manifest
from pipeline.plan import Plan, StageSpec
from pipeline.store import StageFolders
from pipeline.sweep_schema import STAGE_KINDS



class Scheduler(Protocol):
    """What the cluster backend needs from one scheduler; ``calls`` counts commands sent to it."""

    name: str
    calls: int

    def executor(self, folder: Path, resources: dict[str, Any], after: list[str], job_name: str) -> submitit.Executor: ...

    def live_jobs(self, job_ids: list[str]) -> dict[str, str]: ...

    def cancel(self, job_ids: list[str]) -> None: ...


@dataclass
class SubmitSummary:
    submitted: dict[str, str] = field(default_factory=dict)  # stage -> job id
    skipped_done: list[str] = field(default_factory=list)
    skipped_live: dict[str, str] = field(default_factory=dict)  # stage -> job id still queued/running
    arrays: int = 0


def resource_key(resources: dict[str, Any]) -> str:
    return json.dumps(resources, sort_keys=True)


def array_groups(stages: list[StageSpec]) -> list[list[StageSpec]]:
    """Stages split by (kind, resources), in an order where every upstream kind comes first."""
    groups: dict[tuple[int, str], list[StageSpec]] = {}
    for spec in stages:
        groups.setdefault((STAGE_KINDS.index(spec.kind), resource_key(spec.resources)), []).append(spec)
    return [groups[key] for key in sorted(groups)]


class ClusterBackend:
    def __init__(
        self, scheduler: Scheduler, root: Path, jobs_dir: Path, job: Callable[..., Any], report: Callable[[str], None] = print
    ):
        self.scheduler = scheduler
        self.root = root
        self.jobs_dir = jobs_dir
        self.job = job
        self.report = report

    def submit(self, plan: Plan) -> SubmitSummary:
        """Submits every stage that is neither DONE nor still queued; call it under the submit lock."""
        manifest = Manifest.load(self.jobs_dir)
        summary = SubmitSummary()
        recorded = {
            name: entry["job_id"] for name, entry in manifest.stages.items()
            if entry.get("backend") == self.scheduler.name and entry.get("job_id") and name in plan.stages
        }
        pending = [name for name in plan.stages if not StageFolders(self.root, name).is_done()]
        live = self.scheduler.live_jobs([recorded[name] for name in pending if name in recorded]) if recorded else {}
        to_submit, resubmitted, stale = [], set(), []
        for name, spec in plan.stages.items():  # plan order: upstream stages come first
            if name not in pending:
                summary.skipped_done.append(name)
            elif live.get(recorded.get(name, ""), "") in LIVE_STATES and resubmitted.isdisjoint(spec.upstream.values()):
                summary.skipped_live[name] = recorded[name]
            else:
                # A queued stage whose upstream goes out again waits on the old job: replace it too.
                if live.get(recorded.get(name, ""), "") in LIVE_STATES:
                    stale.append(recorded[name])
                to_submit.append(spec)
                resubmitted.add(name)
        if stale:
            self.scheduler.cancel(stale)
        job_of = {name: recorded[name] for name in summary.skipped_live}
        folder = self.jobs_dir / self.scheduler.name / time.strftime("%Y%m%d-%H%M%S")
        submitted_jobs: list[str] = []
        for group in array_groups(to_submit):
            after = sorted({job_of[up] for spec in group for up in spec.upstream.values() if up in job_of})
            executor = self.scheduler.executor(folder / "%j", dict(group[0].resources), after, f"{plan.sweep_name}-{group[0].kind}")
            try:
                with executor.batch():
                    jobs = [executor.submit(self.job, spec.to_dict(), str(self.root)) for spec in group]
            except Exception as error:  # submitit wraps the scheduler's refusal in its own error types
                self._roll_back(submitted_jobs, manifest, plan.sweep_name)
                message = " ".join(str(error).split())
                raise BackendError(f"{self.scheduler.name} refused the {group[0].kind} array: {message}") from None
            summary.arrays += 1
            for spec, job in zip(group, jobs):
                job_of[spec.name] = job.job_id
                submitted_jobs.append(job.job_id)
                summary.submitted[spec.name] = job.job_id
                manifest.stages[spec.name] = {
                    "kind": spec.kind, "backend": self.scheduler.name, "job_id": job.job_id, "state": "submitted",
                    "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr),
                    "after": after, "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                }
            manifest.save()  # one atomic write per array
        return summary

    def _roll_back(self, job_ids: list[str], manifest: Manifest, sweep: str) -> None:
        if not job_ids:
            return
        self.scheduler.cancel(job_ids)
        for name, entry in manifest.stages.items():
            if entry.get("job_id") in job_ids:
                entry["state"] = "rolled back"
        manifest.save()
        self.report(f"rolled back {len(job_ids)} job(s) of sweep {sweep} submitted before the refusal")
