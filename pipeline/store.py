"""Where a stage's files live, and how they are written so that a crash never leaves a half file.

Every file goes through ``write_atomic``: the bytes go to a temporary file in the same folder, are
flushed to disk, and are renamed over the target (``os.replace`` is atomic on POSIX). A reader
therefore sees either the old file or the new one, never a torn one. The ``DONE`` marker is written
last, so a stage folder without it is never trusted by a downstream stage.
"""
from __future__ import annotations

import json
import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DONE_MARKER = "DONE"


class CorruptFileError(RuntimeError):
    """A file that exists but cannot be read back; the message names it and what to do."""


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json(path: Path, value: Any) -> None:
    write_atomic(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def write_pickle(path: Path, value: Any) -> None:
    write_atomic(path, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptFileError(f"{path}: not valid JSON ({error}); delete it and re-run the stage that wrote it") from None


def read_pickle(path: Path) -> Any:
    try:
        with path.open("rb") as stream:
            return pickle.load(stream)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, ValueError) as error:
        raise CorruptFileError(
            f"{path}: corrupt pickle ({type(error).__name__}: {error}); delete it and re-run the stage that wrote it"
        ) from None


@dataclass(frozen=True)
class StageFolders:
    """The two folders of one stage: ``logs/<name>/`` (small, human files) and ``weights/<name>/``."""

    root: Path
    name: str

    @property
    def logs(self) -> Path:
        return self.root / "logs" / self.name

    @property
    def weights(self) -> Path:
        return self.root / "weights" / self.name

    @property
    def config(self) -> Path:
        return self.logs / "config.json"

    @property
    def log(self) -> Path:
        return self.logs / "log.pkl"

    @property
    def result(self) -> Path:
        return self.logs / "result.json"

    @property
    def done_marker(self) -> Path:
        return self.logs / DONE_MARKER

    @property
    def checkpoint(self) -> Path:
        return self.weights / "checkpoint.pt"

    @property
    def final_weights(self) -> Path:
        return self.weights / "final.pt"

    @property
    def best_weights(self) -> Path:
        return self.weights / "best.pt"

    def is_done(self) -> bool:
        return self.done_marker.is_file()

    def mark_done(self) -> None:
        write_atomic(self.done_marker, b"")
