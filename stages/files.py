"""Torch files written atomically and read back with a one-line error, and the stage log writer.

Kept apart from the training loop so that evaluate (which trains nothing) uses the same rules; the
run's context (lease, upstream checks, device) is ``stages/context.py``.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from pipeline.plots import write_plots
from pipeline.store import CorruptFileError, StageFolders, write_atomic, write_pickle


class StageError(RuntimeError):
    """A stage cannot go on; the one-line message says which file or setting and what to do."""


def save_torch(path: Path, value: Any) -> None:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    write_atomic(path, buffer.getvalue())


def load_torch(path: Path) -> Any:
    """A torch file; a corrupt one is a one-line error that names the command rebuilding its stage."""
    if not path.is_file():
        raise StageError(f"{path}: missing; the stage that writes it has not finished")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        logs = path.parent.parent.parent / "logs" / path.parent.name
        raise CorruptFileError(
            f"{path}: corrupt torch file ({first_line}); start its stage afresh with: python runner.py stage {logs} --force"
        ) from None


def write_stage_log(folders: StageFolders, log: dict[str, Any], plots: bool) -> None:
    write_pickle(folders.log, log)
    if plots:
        write_plots(log, folders.logs)
