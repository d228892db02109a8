"""The per-sweep manifest: which scheduler job ran or runs each stage, and a lock for submitting.

``jobs/<sweep>/manifest.json`` maps stage names (which carry their content hash) to the job that
ran them and its last known state. It is rewritten atomically after every change, so a killed
``runner.py submit`` leaves a manifest that the next one reads as it was at the last change.
"""
from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pipeline.store import read_json, write_json


class SubmitLockedError(RuntimeError):
    """Another ``submit`` of the same sweep holds the lock."""


@dataclass
class Manifest:
    path: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, jobs_dir: Path) -> "Manifest":
        path = jobs_dir / "manifest.json"
        stages = read_json(path)["stages"] if path.is_file() else {}
        return cls(path, stages)

    def record(self, stage: str, **fields: Any) -> None:
        """Updates one stage's entry on top of the file as it is now, so that a ``cancel`` run by
        another process while a local submit is recording its jobs is not overwritten."""
        if self.path.is_file():
            self.stages = read_json(self.path)["stages"]
        entry = self.stages.setdefault(stage, {})
        entry.update(fields, updated_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.save()

    def save(self) -> None:
        write_json(self.path, {"stages": self.stages})


@contextmanager
def submit_lock(jobs_dir: Path) -> Iterator[None]:
    """Held for the whole of a submit, so two submits of one sweep never both submit a stage.

    Taken before anything slow (preflight imports torch), so a second submit is refused at once.
    A submit refused before it wrote anything (a bad method setting found by preflight) leaves no
    trace: the folders this call created for the lock are removed again.
    """
    created = [folder for folder in (jobs_dir, *jobs_dir.parents) if not folder.exists()]
    jobs_dir.mkdir(parents=True, exist_ok=True)
    lock_path = jobs_dir / "submit.lock"
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_path.read_text().strip() or "?"
            raise SubmitLockedError(
                f"{lock_path}: another submit of this sweep (pid {holder}) is running; wait for it to end, "
                "or see what it runs with: python runner.py status SWEEP"
            ) from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        except BaseException:
            if created and sorted(path.name for path in jobs_dir.iterdir()) == ["submit.lock"]:
                lock_path.unlink(missing_ok=True)
                for folder in created:
                    try:
                        folder.rmdir()
                    except OSError:
                        break
            raise
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
