"""Where a stage's files live, and how they are written so that a crash never leaves a half file.

Every file goes through ``write_atomic``: the bytes go to a temporary file in the same folder, are
flushed to disk, and are renamed over the target (``os.replace`` is atomic on POSIX). A reader
therefore sees either the old file or the new one, never a torn one. Files get the mode the umask
gives (0644 under umask 022, 0664 under 002), not mkstemp's private 0600, so collaborators on a
shared filesystem can read results.

The ``DONE`` marker is written last and is verified, not trusted by its presence: it lists the
files the stage promises with their size and sha256, and the DONE digests of the upstream stages it
was built from. A folder whose files no longer match (a deleted ``final.pt``, a truncated
``log.pkl``), or whose upstream was rebuilt since, is *damaged*: not done, and rebuilt by the next
run.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

DONE_MARKER = "DONE"
DONE_FORMAT = 2


class CorruptFileError(RuntimeError):
    """A file that exists but cannot be read back; the message names it and what to do."""


def current_umask() -> int:
    """The process umask, read without changing it where Linux exposes it (threads may be writing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, 0o666 & ~current_umask())
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


def repair_advice(path: Path) -> str:
    """The command that rebuilds a damaged file: its stage's, when it lies in a stage's logs folder."""
    folder = path.parent
    if path.name == "config.json":
        return f"rebuild its stage from the sweep: python runner.py stage {folder.name} --sweep SWEEP --force"
    if (folder / "config.json").is_file():
        return f"rebuild its stage with: python runner.py stage {folder}"
    return "delete it and run again the command that wrote it"


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptFileError(f"{path}: not valid JSON ({error}); {repair_advice(path)}") from None


def read_pickle(path: Path) -> Any:
    try:
        with path.open("rb") as stream:
            return pickle.load(stream)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, ValueError) as error:
        raise CorruptFileError(f"{path}: corrupt pickle ({type(error).__name__}: {error}); {repair_advice(path)}") from None


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
    def analysis_numbers(self) -> Path:
        """analyze: every number of the analysis, as JSON."""
        return self.logs / "analysis.json"

    @property
    def analysis_record(self) -> Path:
        """analyze: the numbers and the per-tap arrays (histograms, mean maps, spectra) the figures draw."""
        return self.logs / "analysis.pkl"

    @property
    def analysis_partial(self) -> Path:
        """analyze: the taps analysed so far, so a requeued stage goes on from the next one."""
        return self.weights / "analysis_partial.pkl"

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

    @property
    def prepared_images(self) -> Path:
        """A ``prepare_data`` stage's output: the data set's decoded images and labels."""
        return self.weights / "images.pt"

    @property
    def teacher_logits(self) -> Path:
        """A ``teacher_outputs`` stage's output: the teacher's logits of every batch its students see."""
        return self.weights / "teacher_logits.npy"

    @property
    def teacher_top_k(self) -> tuple[Path, Path, Path]:
        """A ``teacher_outputs`` stage's output with ``top_k``: per sample the k largest logits, their
        classes, and the one logit every other class stands in with (stages/teacher_outputs.py)."""
        return (self.weights / "teacher_top_k_logits.npy", self.weights / "teacher_top_k_classes.npy",
                self.weights / "teacher_top_k_fill.npy")

    def teacher_features(self, taps: int) -> list[Path]:
        """A ``teacher_outputs`` stage's cached features: one array per tap, in its settings' order."""
        return [self.weights / f"teacher_features_{index}.npy" for index in range(taps)]

    def is_done(self) -> bool:
        """DONE is there and its files (sizes, and sha256 where the mtime moved) and upstreams match."""
        return self.done_problem() is None and self.done_marker.is_file()

    def done_problem(self, full: bool = False) -> str | None:
        """Why a folder with a DONE marker is damaged, or None (also when there is no DONE at all).

        The quick check (``full=False``, what status and submit use) compares sizes and re-hashes
        only files whose mtime moved since DONE; ``full=True`` (a stage about to read its upstream)
        re-hashes every file.
        """
        if not self.done_marker.is_file():
            return None
        try:
            done = json.loads(self.done_marker.read_text())
            files = done["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"{self.done_marker} is not a verified DONE record (written by an older kdbench, or damaged)"
        for relative, expected in files.items():
            path = self.root / relative
            try:
                status = path.stat()
            except FileNotFoundError:
                return f"{path} is missing"
            if status.st_size != expected["size"]:
                return f"{path} has {status.st_size} bytes, DONE recorded {expected['size']}"
            if (full or status.st_mtime_ns != expected["mtime_ns"]) and file_sha256(path) != expected["sha256"]:
                return f"{path} changed since DONE (sha256 differs)"
        changed = self.changed_upstream()
        if changed is not None:
            return f"upstream stage {changed} was rebuilt or invalidated after this stage was built from it"
        return None

    def changed_upstream(self) -> str | None:
        """The first upstream stage whose DONE differs from the one this stage was built from, if any.

        Such a stage is stale, not merely damaged: it is rebuilt from scratch, not from its checkpoint.
        """
        try:
            upstream = json.loads(self.done_marker.read_text())["upstream"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        for name, digest in upstream.items():
            if done_digest(StageFolders(self.root, name)) != digest:
                return name
        return None

    def mark_done(self, files: Iterable[Path] = (), upstream: Iterable[str] = ()) -> None:
        """Writes DONE listing ``files`` (under root) and the current DONE digests of ``upstream`` stages."""
        record = {
            "format": DONE_FORMAT,
            "stage": self.name,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "files": {str(path.relative_to(self.root)): file_record(path) for path in files},
            "upstream": {name: done_digest(StageFolders(self.root, name)) for name in upstream},
        }
        write_json(self.done_marker, record)

    def clear_done(self) -> None:
        """Takes DONE away first, so no reader trusts the folder while it is rebuilt."""
        self.done_marker.unlink(missing_ok=True)

    def discard_outputs(self) -> None:
        """What ``--force`` and ``invalidate`` remove: DONE first, then all a rebuild from scratch rewrites."""
        self.clear_done()
        for path in (self.checkpoint, self.final_weights, self.best_weights, self.prepared_images, self.teacher_logits,
                     *self.teacher_top_k, *self.weights.glob("teacher_features_*.npy"), self.log, self.result, self.analysis_numbers,
                     self.analysis_record, self.analysis_partial):
            path.unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path) -> Mapping[str, Any]:
    status = path.stat()
    return {"size": status.st_size, "mtime_ns": status.st_mtime_ns, "sha256": file_sha256(path)}


def done_digest(folders: StageFolders) -> str | None:
    """sha256 of a stage's DONE record: a dependant stores it, so a rebuilt upstream makes it stale."""
    try:
        return hashlib.sha256(folders.done_marker.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None
