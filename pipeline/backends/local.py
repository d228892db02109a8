"""The embedded backend: runs a plan's stages as submitit LocalExecutor jobs on this machine.

LocalExecutor has no job dependencies, so this backend releases a stage only once its upstream
stages are DONE, and keeps at most ``max_parallel`` jobs running (each pinned to its ``cpus``
share), which is what lets a whole sweep share a laptop's cores without oversubscribing them.
A failed stage blocks only its own downstream stages; the rest of the sweep goes on.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import submitit

from pipeline.manifest import Manifest
from pipeline.plan import Plan, StageSpec
from pipeline.store import StageFolders

StageJob = Callable[[dict[str, Any], str], str]
"""What a job runs: (stage spec as a dict, output root) -> stage name. Passed in by the caller."""


@dataclass(frozen=True)
class StageOutcome:
    name: str
    state: str  # done | skipped | failed | cancelled | blocked
    seconds: float = 0.0
    error: str = ""


TRACE_RULE = "-" * 22
"""submitit's FailedJobError puts the job's traceback between two such rules, then the log paths."""


def last_error_line(error: BaseException) -> str:
    """The last non-empty line of a job's traceback: the exception's own one-line message."""
    text = str(error)
    parts = text.split(TRACE_RULE)
    if len(parts) >= 3:
        text = TRACE_RULE.join(parts[1:-1])
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


class LocalBackend:
    def __init__(
        self,
        root: Path,
        jobs_dir: Path,
        job: StageJob,
        max_parallel: int,
        report: Callable[[str], None] = print,
        poll_seconds: float = 0.2,
    ):
        self.root = root
        self.jobs_dir = jobs_dir
        self.job = job
        self.max_parallel = max(1, max_parallel)
        self.report = report
        self.poll_seconds = poll_seconds

    def run(self, plan: Plan) -> list[StageOutcome]:
        manifest = Manifest.load(self.jobs_dir)
        outcomes: dict[str, StageOutcome] = {}
        waiting: list[StageSpec] = []
        for spec in plan.stages.values():
            if StageFolders(self.root, spec.name).is_done():
                outcomes[spec.name] = StageOutcome(spec.name, "skipped")
                if manifest.stages.get(spec.name, {}).get("state") != "done":
                    manifest.record(spec.name, kind=spec.kind, state="done")
            else:
                waiting.append(spec)
        if outcomes:
            self.report(f"{len(outcomes)} stage(s) already DONE, skipped")
        running: dict[str, tuple[submitit.Job, float]] = {}
        total = len(waiting)
        try:
            while waiting or running:
                waiting = self._block_failed_downstream(waiting, outcomes, manifest)
                for spec in self._ready(waiting, outcomes)[: self.max_parallel - len(running)]:
                    waiting.remove(spec)
                    running[spec.name] = (self._submit(spec), time.monotonic())
                    manifest.record(spec.name, kind=spec.kind, backend="local", job_id=running[spec.name][0].job_id, state="running")
                finished = [name for name, (job, _) in running.items() if job.done()]
                for name in finished:
                    job, started = running.pop(name)
                    outcomes[name] = self._outcome(name, job, time.monotonic() - started, manifest)
                    finished_count = sum(o.state in ("done", "failed", "cancelled") for o in outcomes.values())
                    outcome = outcomes[name]
                    detail = f"{outcome.seconds:.1f} s" if outcome.state == "done" else outcome.error
                    self.report(f"[{finished_count}/{total}] {outcome.state:6} {name} ({detail})")
                if not finished:
                    time.sleep(self.poll_seconds)
        except KeyboardInterrupt:
            for name, (job, _) in running.items():
                job.cancel(check=False)
                manifest.record(name, state="cancelled")
            raise
        return [outcomes[name] for name in plan.stages]

    def _submit(self, spec: StageSpec) -> submitit.Job:
        executor = submitit.LocalExecutor(folder=self.jobs_dir / "local" / "%j")
        executor.update_parameters(timeout_min=int(spec.resources.get("time_min", 60)))
        return executor.submit(self.job, spec.to_dict(), str(self.root))

    def _ready(self, waiting: list[StageSpec], outcomes: dict[str, StageOutcome]) -> list[StageSpec]:
        return [
            spec for spec in waiting
            if all(outcomes.get(name, StageOutcome(name, "")).state in ("done", "skipped") for name in spec.upstream.values())
        ]

    def _block_failed_downstream(
        self, waiting: list[StageSpec], outcomes: dict[str, StageOutcome], manifest: Manifest
    ) -> list[StageSpec]:
        still_waiting = []
        for spec in waiting:
            failed = [
                name for name in spec.upstream.values()
                if outcomes.get(name, StageOutcome(name, "")).state in ("failed", "cancelled", "blocked")
            ]
            if failed:
                message = f"upstream stage {failed[0]} did not finish"
                outcomes[spec.name] = StageOutcome(spec.name, "blocked", error=message)
                manifest.record(spec.name, kind=spec.kind, backend="local", state="blocked", error=message)
                self.report(f"blocked {spec.name} ({message})")
            else:
                still_waiting.append(spec)
        return still_waiting

    def _outcome(self, name: str, job: submitit.Job, seconds: float, manifest: Manifest) -> StageOutcome:
        error = job.exception()
        if error is None:
            manifest.record(name, state="done", seconds=round(seconds, 2))
            return StageOutcome(name, "done", seconds)
        if Manifest.load(self.jobs_dir).stages.get(name, {}).get("state") == "cancelled":
            manifest.record(name, state="cancelled")  # `runner.py cancel` ended it: not a failure
            return StageOutcome(name, "cancelled", seconds, "cancelled")
        message = last_error_line(error)
        manifest.record(name, state="failed", error=message, stderr=str(job.paths.stderr))
        return StageOutcome(name, "failed", seconds, message)
