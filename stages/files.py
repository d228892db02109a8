"""File plumbing the stages share: torch files written atomically, upstream checks, the run record.

Kept apart from the training loop so that evaluate (which trains nothing) uses the same rules.
"""
from __future__ import annotations

import io
import os
import pickle
import platform
import socket
from pathlib import Path
from typing import Any

import numpy
import tensorly
import torch

from pipeline.plan import StageSpec
from pipeline.plots import write_plots
from pipeline.store import CorruptFileError, StageFolders, write_atomic, write_json, write_pickle


class StageError(RuntimeError):
    """A stage cannot go on; the one-line message says which file or setting and what to do."""


def save_torch(path: Path, value: Any) -> None:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    write_atomic(path, buffer.getvalue())


def load_torch(path: Path) -> Any:
    if not path.is_file():
        raise StageError(f"{path}: missing; the stage that writes it has not finished")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CorruptFileError(f"{path}: corrupt torch file ({first_line}); delete it to restart the stage that wrote it") from None


def upstream_folders(spec: StageSpec, root: Path) -> dict[str, StageFolders]:
    """The folders of ``spec``'s upstream stages, refusing any that is not DONE."""
    folders = {}
    for role, name in spec.upstream.items():
        upstream = StageFolders(root, name)
        if not upstream.is_done():
            raise StageError(
                f"{spec.name}: upstream {role} stage {name} is not DONE ({upstream.done_marker} missing): "
                "it failed, was cancelled or has not run yet; see runner.py status"
            )
        folders[role] = upstream
    return folders


def select_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise StageError("device 'cuda' requested but torch sees no CUDA device; set device: auto or cpu")
    return torch.device(requested)


def use_amp(spec: StageSpec, device: torch.device) -> bool:
    """bfloat16 autocast where the sweep asks for it and the device is a GPU; a no-op on CPU."""
    return bool(spec.runtime.get("amp", False)) and device.type == "cuda"


def run_record(spec: StageSpec, device: torch.device, seed: int | None) -> dict[str, Any]:
    """The fields every log.pkl starts with: what ran, with what, where."""
    return {
        "format": 1,
        "stage": spec.kind,
        "name": spec.name,
        "hash": spec.hash,
        "settings": spec.settings,
        "upstream": dict(spec.upstream),
        "environment": {
            "python": platform.python_version(),
            "torch": str(torch.__version__),  # a TorchVersion would make unpickling the log import torch
            "tensorly": tensorly.__version__,
            "numpy": numpy.__version__,
            "device": str(device) if device.type != "cuda" else f"cuda ({torch.cuda.get_device_name(device)})",
            "hostname": socket.gethostname(),
            "seed": seed,
            "threads": torch.get_num_threads(),
            "amp": use_amp(spec, device),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "pbs_job_id": os.environ.get("PBS_JOBID"),
        },
    }


def write_stage_log(folders: StageFolders, log: dict[str, Any], plots: bool) -> None:
    write_pickle(folders.log, log)
    if plots:
        write_plots(log, folders.logs)


def begin_stage(spec: StageSpec, root: Path) -> StageFolders:
    """Writes config.json first, so a running or killed stage shows what it is (and can be re-run from it).

    Also pins torch to the stage's CPU share, so parallel local jobs do not oversubscribe the cores.
    """
    torch.set_num_threads(max(1, int(spec.resources.get("cpus", 1))))
    folders = StageFolders(root, spec.name)
    write_json(folders.config, spec.to_dict())
    return folders


def finish_stage(folders: StageFolders, log: dict[str, Any]) -> None:
    """Writes log.pkl and the plots, then the DONE marker: last, so it is only there if all else is."""
    write_stage_log(folders, log, plots=True)
    folders.mark_done()
