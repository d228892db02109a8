"""One stage hash, one live runner: the lease a stage takes in its own folder before it trains.

Stage folders are shared by hash across sweeps, users and backends, so the submit lock of one sweep
cannot keep two runners out of one folder. The lease can: ``logs/<stage>/LEASE`` holds who runs the
stage (token, host, PID and its start time, scheduler job id, start time, timeout). It is created
with ``os.link`` of a complete temporary file, which fails when the lease exists and is atomic on
local filesystems and NFS alike (no reliance on ``flock``). Its mtime is the heartbeat, bumped by
the holder every ``timeout / 10`` seconds and at every epoch; the content is never rewritten.

A lease is *live* unless its holder is provably dead:

* the heartbeat is older than the timeout the holder declared (any host);
* the holder ran on this host and its PID is gone, or now belongs to another process;
* the holder is this very scheduler job in an earlier run (Slurm requeue, preemption).

A dead lease is taken over: renamed aside (one rename wins), checked to be the one judged dead
(else put back), then replaced; the new holder's log records the takeover. The holder checks each
epoch that the lease is still its own, so a runner whose lease was taken over stops before it
writes another file.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

LEASE_FILE = "LEASE"
TIMEOUT_ENV = "KDBENCH_LEASE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300.0


class LeaseHeldError(RuntimeError):
    """Another live runner holds the stage; the caller stands aside (this is not a failure)."""

    def __init__(self, folder: Path, lease: "Lease"):
        super().__init__(f"{folder.name}: already running elsewhere ({lease.describe()})")
        self.lease = lease


class LeaseLostError(RuntimeError):
    """This runner's lease was taken over (its heartbeat went stale); it must write nothing more."""


@dataclass(frozen=True)
class Lease:
    token: str
    host: str
    pid: int
    pid_started: str | None
    job_id: str | None
    started_at: float
    timeout_s: float
    heartbeat_at: float = 0.0  # the file's mtime, not stored in it

    def describe(self) -> str:
        job = f", job {self.job_id}" if self.job_id else ""
        age = max(0.0, time.time() - self.heartbeat_at)
        return f"host {self.host}, pid {self.pid}{job}, heartbeat {age:.0f} s ago"


def lease_timeout() -> float:
    return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


def current_job_id() -> str | None:
    """This process's scheduler job as the backends record it (Slurm arrays as ``<array>_<task>``)."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("PBS_JOBID")


def process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (Linux), which tells a reused PID apart."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[19]
    except (OSError, IndexError):
        return None


def read_lease(folder: Path) -> Lease | None:
    """The lease in a stage's logs folder, or None when there is none (or it vanished meanwhile)."""
    path = folder / LEASE_FILE
    try:
        text = path.read_text()
        heartbeat = path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        return Lease(**{key: data[key] for key in Lease.__dataclass_fields__ if key != "heartbeat_at"}, heartbeat_at=heartbeat)
    except (ValueError, KeyError, TypeError):
        # Unreadable: written by something else, or a torn copy. Judge it by its age alone.
        return Lease("?", "?", -1, None, None, heartbeat, DEFAULT_TIMEOUT_S, heartbeat)


def holder_alive(lease: Lease, now: float | None = None) -> bool:
    """Whether the lease's holder may still be running (see the module docstring for the rules)."""
    now = time.time() if now is None else now
    if now - lease.heartbeat_at > lease.timeout_s:
        return False
    if lease.job_id is not None and lease.job_id == current_job_id() and lease.pid != os.getpid():
        return False  # this scheduler job, requeued: its earlier run is gone
    if lease.host == socket.gethostname():
        started = process_start(lease.pid)
        if started is None:
            return not Path("/proc").is_dir() and _pid_exists(lease.pid)
        return lease.pid_started is None or started == lease.pid_started
    return True


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def live_lease(folder: Path) -> Lease | None:
    """The folder's lease if its holder may still be running, else None."""
    lease = read_lease(folder)
    return lease if lease is not None and holder_alive(lease) else None


class StageLease:
    """The lease this process holds on one stage folder, with its heartbeat thread."""

    def __init__(self, folder: Path, lease: Lease, taken_over: Lease | None):
        self.folder = folder
        self.path = folder / LEASE_FILE
        self.lease = lease
        self.taken_over = taken_over
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{folder.name}", daemon=True)

    @classmethod
    def acquire(cls, folder: Path, timeout_s: float | None = None) -> "StageLease":
        """Takes the lease, taking over a dead holder's; raises LeaseHeldError when a live one has it."""
        folder.mkdir(parents=True, exist_ok=True)
        timeout_s = lease_timeout() if timeout_s is None else timeout_s
        mine = Lease(
            token=uuid.uuid4().hex, host=socket.gethostname(), pid=os.getpid(), pid_started=process_start(os.getpid()),
            job_id=current_job_id(), started_at=time.time(), timeout_s=timeout_s,
        )
        taken_over = None
        for _ in range(5):
            if _link_new(folder, mine):
                lease = cls(folder, mine, taken_over)
                lease._thread.start()
                return lease
            current = read_lease(folder)
            if current is None:
                continue  # released between our link and our read: try again
            if holder_alive(current):
                raise LeaseHeldError(folder, current)
            if _set_aside(folder, current, mine.token):
                taken_over = current
        current = read_lease(folder)
        raise LeaseHeldError(folder, current or mine)

    def holds(self) -> bool:
        current = read_lease(self.folder)
        return current is not None and current.token == self.lease.token

    def check(self) -> None:
        """Bumps the heartbeat; raises LeaseLostError when another runner has taken the lease over."""
        if self._lost.is_set() or not self.holds():
            self._lost.set()
            raise LeaseLostError(
                f"{self.folder.name}: this runner's lease was taken over (its heartbeat went stale, "
                f"over {self.lease.timeout_s:.0f} s); it stops without writing more"
            )
        self._touch()

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self.holds():
            self.path.unlink(missing_ok=True)

    def _touch(self) -> None:
        try:
            os.utime(self.path)
        except FileNotFoundError:
            self._lost.set()

    def _beat(self) -> None:
        interval = max(0.5, self.lease.timeout_s / 10)
        while not self._stop.wait(interval):
            if not self.holds():
                self._lost.set()
                return
            self._touch()

    def __enter__(self) -> "StageLease":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


def _link_new(folder: Path, lease: Lease) -> bool:
    """Creates LEASE from a complete temporary file; False when a lease is already there."""
    temporary = folder / f".{LEASE_FILE}.{lease.token}.tmp"
    temporary.write_text(json.dumps({key: value for key, value in asdict(lease).items() if key != "heartbeat_at"}))
    try:
        os.link(temporary, folder / LEASE_FILE)
        return True
    except FileExistsError:
        return False
    finally:
        temporary.unlink(missing_ok=True)


def _set_aside(folder: Path, dead: Lease, token: str) -> bool:
    """Moves the dead lease away; if what moved was a fresh lease taken meanwhile, puts it back."""
    aside = folder / f".{LEASE_FILE}.dead-{token}"
    try:
        os.replace(folder / LEASE_FILE, aside)
    except FileNotFoundError:
        return False
    moved = read_lease_file(aside)
    if moved is not None and moved.get("token") not in (dead.token, None) and dead.token != "?":
        try:
            os.link(aside, folder / LEASE_FILE)
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True


def read_lease_file(path: Path) -> Mapping[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
