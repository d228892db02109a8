"""One stage run's context, opened once and closed once, so a stage body writes only what is its own.

``run_stage`` is the only door into a stage. In order, it:

1. skips a stage whose DONE is verified (``pipeline.store``);
2. checks the upstream stages: each must be DONE and verified in full (every file re-hashed); one
   that another runner is still building (live lease) is waited for; anything else is refused with
   the command that fixes it;
3. takes the stage's lease (``pipeline.leases``); a live holder elsewhere means this runner stands
   aside and returns ``"elsewhere"``, which is not a failure;
4. clears a damaged DONE (or, with ``force``, the stage's outputs and checkpoint), writes
   ``config.json``, pins torch to the stage's CPU share, picks the device and sets the runtime
   switches (``stages/runtime.py``) that act on the whole process (``cudnn_benchmark``);
5. hands a ``StageRun`` to ``stages/<kind>.py``'s ``run``, whose ``finish`` writes ``log.pkl``, the
   plots and last the verified DONE listing the promised files;
6. releases the lease, whatever happened.
"""
from __future__ import annotations

import importlib
import os
import platform
import socket
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy
import tensorly
import torch
from torch import nn
from tqdm import tqdm

from pipeline.leases import LeaseHeldError, StageLease, live_lease
from pipeline.plan import StageSpec
from pipeline.store import StageFolders, write_json
from pipeline.sweep_schema import STAGE_KINDS
from stages.distributed import Ranks, join_ranks, leave_ranks
from stages.files import StageError, write_stage_log
from stages.runtime import RuntimeSwitches, compile_call

UPSTREAM_POLL_ENV = "KDBENCH_UPSTREAM_POLL_S"


def rebuild_command(folders: StageFolders) -> str:
    """The command that (re)builds one stage from its own folder."""
    return f"python runner.py stage {folders.logs}"


def select_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise StageError("device 'cuda' requested but torch sees no CUDA device; set device: auto or cpu")
    return torch.device(requested)


@dataclass
class StageRun:
    """What a stage body needs: its spec and folders, its verified upstream folders, the device and
    runtime switches, the lease (held by rank 0 alone: ``ranks``, stages/distributed.py).
    ``compile_fallbacks`` maps each module whose compiled call failed (``prepare``) to the reason;
    ``finish`` writes it to log.pkl as ``compile_fallback``."""

    spec: StageSpec
    root: Path
    folders: StageFolders
    upstream: dict[str, StageFolders]
    device: torch.device
    lease: StageLease | None
    repaired: str | None = None
    ranks: Ranks = Ranks()
    compile_fallbacks: dict[str, str] = field(default_factory=dict)

    @property
    def switches(self) -> RuntimeSwitches:
        """The spec's runtime switches as they take effect on this stage's device."""
        return RuntimeSwitches.on_device(self.spec.runtime, self.device)

    def prepare(self, module: nn.Module, role: str, call: str = "forward") -> nn.Module:
        """``module`` (the same object) on the device, channels-last and with ``call`` compiled where
        the switches say so. ``role`` (student, teacher, method, ...) names it in a compile fallback."""
        switches = self.switches
        module.to(self.device)
        if switches.channels_last:
            module.to(memory_format=torch.channels_last)
        if switches.compile:
            compile_call(module, call, lambda reason: self._compile_failed(role, reason))
        return module

    def _compile_failed(self, role: str, reason: str) -> None:
        # tqdm.write: the line goes above a training loop's progress bar, not into it.
        tqdm.write(f"warning: {self.spec.name}: torch.compile of the {role} failed, it runs eager: {reason}",
                   file=sys.stderr)
        self.compile_fallbacks[role] = reason

    def heartbeat(self) -> None:
        """Called every epoch: refreshes the lease, and stops this runner if it lost it."""
        if self.lease is not None:
            self.lease.check()

    def record(self, seed: int | None) -> dict[str, Any]:
        """The fields every log.pkl starts with: what ran, with what, where, and by whom."""
        device = self.device
        taken_over = None if self.lease is None else self.lease.taken_over
        return {
            "format": 1,
            "stage": self.spec.kind,
            "name": self.spec.name,
            "hash": self.spec.hash,
            "settings": self.spec.settings,
            "upstream": dict(self.spec.upstream),
            "environment": {
                "python": platform.python_version(),
                "torch": str(torch.__version__),  # a TorchVersion would make unpickling the log import torch
                "tensorly": tensorly.__version__,
                "numpy": numpy.__version__,
                "device": str(device) if device.type != "cuda" else f"cuda ({torch.cuda.get_device_name(device)})",
                "hostname": socket.gethostname(),
                "pid": os.getpid(),
                "seed": seed,
                "threads": torch.get_num_threads(),
                **self.switches.record(),
                "ranks": self.ranks.world,
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "pbs_job_id": os.environ.get("PBS_JOBID"),
            },
            "lease_takeover": None if taken_over is None else {
                "host": taken_over.host, "pid": taken_over.pid, "job_id": taken_over.job_id,
                "heartbeat_age_s": round(time.time() - taken_over.heartbeat_at, 1),
            },
            "repaired": self.repaired,
        }

    def finish(self, log: dict[str, Any], outputs: Iterable[Path], plots: bool) -> None:
        """Writes log.pkl (and the plots), then DONE listing config, log and ``outputs`` with their hashes
        (rank 0's job; the other ranks write nothing)."""
        if not self.ranks.writer:
            return
        self.heartbeat()
        log = {**log, "compile_fallback": dict(self.compile_fallbacks) or None}
        write_stage_log(self.folders, log, plots=plots)
        promised = [self.folders.config, self.folders.log, *outputs]
        missing = [str(path) for path in promised if not path.is_file()]
        if missing:
            raise StageError(f"{self.spec.name}: finished without writing {', '.join(missing)}")
        self.folders.mark_done(promised, upstream=self.spec.upstream.values())


def run_stage(spec: StageSpec, root: Path, force: bool = False) -> str:
    """Runs one stage to completion (resuming from its checkpoint) unless it is verified DONE.

    Returns ``"skipped"`` (already DONE), ``"done"`` (this call built it) or ``"elsewhere"``
    (another live runner holds it; wait for its DONE). In a job of several tasks each task is a rank
    (stages/distributed.py): rank 0 decides, holds the lease and writes; the others train beside it.
    """
    if spec.kind not in STAGE_KINDS:
        raise ValueError(f"unknown stage kind {spec.kind!r}; allowed: {', '.join(STAGE_KINDS)}")
    ranks = join_ranks()
    finished = False
    try:
        outcome = _run_as_writer(spec, root, force, ranks) if ranks.writer else _run_beside_writer(spec, root, ranks)
        finished = True
        return outcome
    finally:
        leave_ranks(ranks, finished)


def _run_as_writer(spec: StageSpec, root: Path, force: bool, ranks: Ranks) -> str:
    """Rank 0: claims the stage, tells the other ranks whether it runs (once, on every path, or they
    would wait in the broadcast until RANK_TIMEOUT) and builds it under its lease."""
    with ExitStack() as held:
        claim: StageRun | str = "failed"
        try:
            claim = _claim_stage(spec, root, force, ranks, held)
        finally:
            ranks.agree(int(isinstance(claim, StageRun)))
        if isinstance(claim, str):
            return claim
        _run_body(claim)
    return "done"


def _claim_stage(spec: StageSpec, root: Path, force: bool, ranks: Ranks, held: ExitStack) -> StageRun | str:
    """The stage's run, its lease held until ``held`` closes; or why it does not run here: "skipped"
    (verified DONE, before or after taking the lease) or "elsewhere" (another live runner holds it)."""
    folders = StageFolders(root, spec.name)
    if not force and folders.is_done():
        return "skipped"
    upstream = wait_for_upstream(spec, root)
    try:
        lease = StageLease.acquire(folders.logs)
    except LeaseHeldError as elsewhere:
        print(f"{elsewhere}; standing aside", file=sys.stderr)
        return "elsewhere"
    held.callback(lease.release)
    if not force and folders.is_done():
        return "skipped"
    repaired = None
    if force:
        folders.discard_outputs()
    elif folders.done_marker.exists():
        # Own files damaged: resume from the checkpoint. Built from an older upstream: start afresh.
        repaired = folders.done_problem()
        if folders.changed_upstream() is not None:
            folders.discard_outputs()
        folders.clear_done()
    write_json(folders.config, spec.to_dict())
    return StageRun(spec, root, folders, upstream, _rank_device(spec, ranks), lease, repaired, ranks)


def _run_beside_writer(spec: StageSpec, root: Path, ranks: Ranks) -> str:
    """A rank above 0: trains the stage if rank 0 does, writing nothing."""
    if not ranks.agree(0):
        return "skipped"
    folders = StageFolders(root, spec.name)
    upstream = {role: StageFolders(root, name) for role, name in spec.upstream.items()}  # rank 0 verified them
    _run_body(StageRun(spec, root, folders, upstream, _rank_device(spec, ranks), None, None, ranks))
    return "done"


def _run_body(stage: StageRun) -> None:
    """The stage kind's own code, with the switches that act on the whole process set first."""
    torch.backends.cudnn.benchmark = stage.switches.cudnn_benchmark
    importlib.import_module(f"stages.{stage.spec.kind}").run(stage)


def _rank_device(spec: StageSpec, ranks: Ranks) -> torch.device:
    """The stage's device, for a rank its own GPU (``cuda:<local rank>``), with torch pinned to its CPU share."""
    torch.set_num_threads(max(1, int(spec.resources.get("cpus", 1))))
    device = select_device(spec.runtime.get("device", "auto"))
    if device.type == "cuda" and ranks.world > 1:
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    return device


def wait_for_upstream(spec: StageSpec, root: Path) -> dict[str, StageFolders]:
    """The upstream folders, each verified in full; waits while a live runner is still building one."""
    poll = float(os.environ.get(UPSTREAM_POLL_ENV, 10))
    folders = {}
    for role, name in spec.upstream.items():
        upstream = StageFolders(root, name)
        while True:
            problem = upstream.done_problem(full=True)
            if problem is None and upstream.done_marker.is_file():
                break
            holder = live_lease(upstream.logs)
            if holder is None:
                raise StageError(upstream_message(spec, role, upstream, problem))
            time.sleep(poll)
        folders[role] = upstream
    return folders


def upstream_message(spec: StageSpec, role: str, upstream: StageFolders, problem: str | None) -> str:
    if problem is not None:
        return f"{spec.name}: upstream {role} stage {upstream.name} is damaged ({problem}); rebuild it with: {rebuild_command(upstream)}"
    if upstream.config.is_file():
        return (
            f"{spec.name}: upstream {role} stage {upstream.name} is not DONE ({upstream.done_marker} missing): it failed "
            f"or was cancelled (see runner.py status SWEEP); finish it with: {rebuild_command(upstream)}"
        )
    return (
        f"{spec.name}: upstream {role} stage {upstream.name} is not DONE ({upstream.done_marker} missing) and has never "
        "started; run the sweep that holds it: python runner.py submit SWEEP"
    )
