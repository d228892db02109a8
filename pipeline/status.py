"""Where each stage of a sweep stands, from the manifest, the stage files and the scheduler's queue.

The queue is asked only which recorded jobs are still queued or running; everything else comes
from files: DONE means done, a recorded job that left the queue without DONE failed (its stderr
tail says why). So status is right on clusters without accounting (no sacct) and after a crash
of the submitting process.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.backends import LIVE_STATES, live_jobs
from pipeline.leases import live_lease
from pipeline.manifest import Manifest
from pipeline.plan import Plan, StageSpec
from pipeline.progress import read_progress
from pipeline.store import StageFolders

LiveJobs = Callable[[str, list[str]], dict[str, str]]
"""(backend name, job ids) -> {job id: scheduler state} for the jobs still queued or running."""

FINAL_RECORDED = ("failed", "cancelled", "rolled back", "refused")


@dataclass(frozen=True)
class StageStatus:
    name: str
    kind: str
    state: str  # done | damaged | running | queued | failed | cancelled | refused | rolled back | blocked | not submitted
    job_id: str = ""
    detail: str = ""
    in_queue: bool = False
    """The stage's recorded job is still listed by the scheduler, whatever the state says: a blocked
    stage's task pends until afterany lets it start, and fail on its missing upstream."""


def stderr_tail(path: str | None, lines: int = 3) -> str:
    if not path or not Path(path).is_file():
        return ""
    with open(path, errors="replace") as stream:
        tail = deque((line.rstrip() for line in stream if line.strip()), maxlen=lines)
    return " | ".join(tail)


def sweep_status(plan: Plan, root: Path, manifest: Manifest, live_jobs: LiveJobs) -> list[StageStatus]:
    by_backend: dict[str, list[str]] = {}
    for name in plan.stages:
        entry = manifest.stages.get(name, {})
        for key in ("job_id", "held_by_job"):  # this sweep's job, or another sweep's it waits on
            if entry.get(key) and not StageFolders(root, name).is_done():
                by_backend.setdefault(entry.get("backend", "local"), []).append(str(entry[key]))
    live: dict[str, str] = {}
    for backend, job_ids in by_backend.items():
        live.update(live_jobs(backend, job_ids))

    statuses: dict[str, StageStatus] = {}
    for name, spec in plan.stages.items():
        entry = manifest.stages.get(name, {})
        job_id = str(entry.get("job_id", ""))
        folders = StageFolders(root, name)
        if folders.is_done():
            statuses[name] = StageStatus(name, spec.kind, "done", job_id)
            continue
        failed_upstream = [up for up in spec.upstream.values() if statuses[up].state in ("failed", "cancelled", "blocked")]
        queue_state = live.get(job_id, "") if job_id else ""
        in_queue = queue_state in LIVE_STATES
        holder = live_lease(folders.logs)
        damage = folders.done_problem()
        if queue_state in LIVE_STATES and not failed_upstream:
            state = "running" if queue_state == "RUNNING" else "queued"
            statuses[name] = StageStatus(name, spec.kind, state, job_id, running_detail(spec, folders, queue_state.lower()), True)
        elif holder is not None:
            where = f"running elsewhere: {holder.describe()}"
            statuses[name] = StageStatus(name, spec.kind, "running", holder.job_id or "", running_detail(spec, folders, where), in_queue)
        elif live.get(str(entry.get("held_by_job", "")), "") in LIVE_STATES:
            state = "running" if live[str(entry["held_by_job"])] == "RUNNING" else "queued"
            statuses[name] = StageStatus(name, spec.kind, state, "", f"{state} for {entry['held_by']}", True)
        elif damage is not None:
            statuses[name] = StageStatus(name, spec.kind, "damaged", job_id, f"damaged: {damage}; runner.py submit rebuilds it", in_queue)
        elif failed_upstream:
            statuses[name] = StageStatus(name, spec.kind, "blocked", job_id, f"upstream {failed_upstream[0]} did not finish", in_queue)
        elif job_id or entry.get("state") in FINAL_RECORDED:
            recorded = entry.get("state")
            if recorded == "refused":
                state, detail = "refused", f"refused by scheduler: {entry.get('reason', '')}"
            elif recorded == "rolled back":
                refused = entry.get("refused_array", "")
                state, detail = "rolled back", f"rolled back: the {refused} array was refused by scheduler: {entry.get('reason', '')}"
            else:
                state = "cancelled" if recorded == "cancelled" else "failed"
                detail = stderr_tail(entry.get("stderr")) or entry.get("error", "")
            statuses[name] = StageStatus(name, spec.kind, state, job_id, detail)
        else:
            statuses[name] = StageStatus(name, spec.kind, "not submitted")
    return list(statuses.values())


def running_detail(spec: StageSpec, folders: StageFolders, where: str) -> str:
    """The queue state or holder, then the epoch, last loss and ETA read from the stage's log."""
    progress = read_progress(spec, folders)
    return where if progress is None else f"{where}, {progress.describe()}"


def format_status(statuses: list[StageStatus]) -> str:
    width = max((len(status.name) for status in statuses), default=10)
    lines = [f"{'stage':{width}}  {'state':13}  {'job':12}  detail"]
    for status in statuses:
        lines.append(f"{status.name:{width}}  {status.state:13}  {status.job_id:12}  {status.detail}".rstrip())
    counts: dict[str, int] = {}
    for status in statuses:
        counts[status.state] = counts.get(status.state, 0) + 1
    lines.append(", ".join(f"{count} {state}" for state, count in counts.items()))
    return "\n".join(lines)


def current_status(plan: Plan, root: Path) -> list[StageStatus]:
    """The sweep's status now, asking each backend's queue about its recorded jobs."""
    return sweep_status(plan, root, Manifest.load(root / "jobs" / plan.sweep_name), live_jobs)


def wait_for(plan: Plan, root: Path, poll_seconds: float = 5.0) -> bool:
    """Polls files and the queue until none of the sweep's recorded jobs is still queued or running,
    blocked stages' jobs included; True if all stages are done."""
    while True:
        statuses = current_status(plan, root)
        if not any(status.in_queue or status.state in ("queued", "running") for status in statuses):
            return all(status.state == "done" for status in statuses)
        time.sleep(poll_seconds)
