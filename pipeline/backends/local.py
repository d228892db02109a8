"""The embedded backend: runs a plan's stages as submitit LocalExecutor jobs on this machine.

LocalExecutor has no job dependencies, so this backend releases a stage only once its upstream
stages are DONE, and keeps at most ``max_parallel`` jobs running (each pinned to its ``cpus``
share), which is what lets a whole sweep share a laptop's cores without oversubscribing them.
A failed stage blocks only its own downstream stages; the rest of the sweep goes on.

A stage that another live runner holds (another sweep's submit, or the orphaned job of a submit
killed with ``kill -9``: see ``pipeline.leases``) is not started a second time: it is watched until
its DONE appears, and started here only if its holder dies first.
"""
from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import submitit

from pipeline.leases import live_lease
from pipeline.manifest import Manifest
from pipeline.plan import Plan, StageSpec
from pipeline.progress import LiveProgress
from pipeline.store import StageFolders
from pipeline.sweep_schema import rank_count

StageJob = Callable[[dict[str, Any], str], str]
"""What a job runs: (stage spec as a dict, output root) -> stage name. Passed in by the caller."""


@dataclass(frozen=True)
class StageOutcome:
    name: str
    state: str  # done | skipped | failed | cancelled | blocked (done elsewhere counts as done)
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
        progress: LiveProgress | None = None,
        poll_seconds: float = 0.2,
    ):
        self.root = root
        self.jobs_dir = jobs_dir
        self.job = job
        self.max_parallel = max(1, max_parallel)
        self.progress = progress or LiveProgress()
        self.poll_seconds = poll_seconds

    def run(self, plan: Plan, to_run: dict[str, str]) -> list[StageOutcome]:
        """Runs the stages named in ``to_run`` (see ``pipeline.pending``); the others count as skipped."""
        _let_jobs_hear_cancel()
        manifest = Manifest.load(self.jobs_dir)
        outcomes: dict[str, StageOutcome] = {}
        waiting: list[StageSpec] = []
        for spec in plan.stages.values():
            if spec.name in to_run:
                waiting.append(spec)
                if to_run[spec.name] != "not built":
                    self.progress.report(f"rebuilding {spec.name}: {to_run[spec.name]}")
            else:
                outcomes[spec.name] = StageOutcome(spec.name, "skipped")
                if manifest.stages.get(spec.name, {}).get("state") != "done":
                    manifest.record(spec.name, kind=spec.kind, state="done")
        if outcomes:
            self.progress.report(f"{len(outcomes)} stage(s) already DONE, skipped")
        running: dict[str, tuple[submitit.Job, float]] = {}
        watching: dict[str, float] = {}  # held by a live runner elsewhere -> since when
        total = len(waiting)
        try:
            while waiting or running or watching:
                waiting = self._block_failed_downstream(waiting, outcomes, manifest)
                for spec in self._ready(waiting, outcomes):
                    if len(running) >= self.max_parallel:
                        break
                    waiting.remove(spec)
                    holder = live_lease(StageFolders(self.root, spec.name).logs)
                    if holder is not None:
                        watching[spec.name] = time.monotonic()
                        manifest.record(spec.name, kind=spec.kind, backend="local", state="elsewhere", holder=holder.describe())
                        self.progress.report(f"waiting  {spec.name}: already running elsewhere ({holder.describe()})")
                        continue
                    running[spec.name] = (self._submit(spec), time.monotonic())
                    manifest.record(spec.name, kind=spec.kind, backend="local", job_id=running[spec.name][0].job_id, state="running")
                finished = [name for name, (job, _) in running.items() if job.done()]
                for name in finished:
                    job, started = running.pop(name)
                    outcome = self._outcome(name, job, time.monotonic() - started, manifest)
                    if outcome is None:  # it found a live holder when it started: watch that one
                        watching[name] = time.monotonic()
                        continue
                    self._finish(outcome, outcomes, total)
                for name in list(watching):
                    folders = StageFolders(self.root, name)
                    if folders.is_done():
                        outcome = StageOutcome(name, "done", time.monotonic() - watching.pop(name), "built elsewhere")
                        manifest.record(name, state="done")
                        self._finish(outcome, outcomes, total)
                    elif live_lease(folders.logs) is None:
                        watching.pop(name)
                        waiting.insert(0, plan.stages[name])
                        self.progress.report(f"resuming {name}: its runner elsewhere stopped without DONE")
                self.progress.update({name: (plan.stages[name], StageFolders(self.root, name)) for name in running})
                if not finished:
                    time.sleep(self.poll_seconds)
        except KeyboardInterrupt:
            for name, (job, _) in running.items():
                job.cancel(check=False)
                manifest.record(name, state="cancelled")
            raise
        finally:
            self.progress.close()
        return [outcomes[name] for name in plan.stages]

    def _finish(self, outcome: StageOutcome, outcomes: dict[str, StageOutcome], total: int) -> None:
        outcomes[outcome.name] = outcome
        finished_count = sum(o.state in ("done", "failed", "cancelled") for o in outcomes.values())
        if outcome.state != "done":
            detail = outcome.error
        else:
            detail = f"{outcome.seconds:.1f} s" + (f", {outcome.error}" if outcome.error else "")
        self.progress.report(f"[{finished_count}/{total}] {outcome.state:6} {outcome.name} ({detail})")

    def _submit(self, spec: StageSpec) -> submitit.Job:
        executor = submitit.LocalExecutor(folder=self.jobs_dir / "local" / "%j")
        executor.update_parameters(timeout_min=int(spec.resources.get("time_min", 60)), tasks_per_node=rank_count(spec.resources))
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
                self.progress.report(f"blocked {spec.name} ({message})")
            else:
                still_waiting.append(spec)
        return still_waiting

    def _outcome(self, name: str, job: submitit.Job, seconds: float, manifest: Manifest) -> StageOutcome | None:
        """The finished job's outcome; None when it stood aside for a live runner elsewhere."""
        error = job.exception()
        if error is None:
            if job.results()[0] == "elsewhere":  # rank 0's word, for a job of several ranks
                manifest.record(name, state="elsewhere")
                return None
            manifest.record(name, state="done", seconds=round(seconds, 2))
            return StageOutcome(name, "done", seconds)
        if Manifest.load(self.jobs_dir).stages.get(name, {}).get("state") == "cancelled":
            manifest.record(name, state="cancelled")  # `runner.py cancel` ended it: not a failure
            return StageOutcome(name, "cancelled", seconds, "cancelled")
        message = last_error_line(error)
        manifest.record(name, state="failed", error=message, stderr=str(job.paths.stderr))
        return StageOutcome(name, "failed", seconds, message)


def _let_jobs_hear_cancel() -> None:
    """Gives SIGINT back its default handler where this process was started ignoring it (a submit
    sent to the background of a script, ``runner.py submit ... &``). An ignored signal stays ignored
    across exec, so every job controller started from here would ignore the SIGINT by which
    ``runner.py cancel`` stops it, and the cancelled stage would train on; a handled one is reset."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
