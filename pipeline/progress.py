"""How far a running stage has got, read from the ``log.pkl`` it rewrites after every epoch.

The same reading serves ``status`` (any backend: the files are all it needs) and the live lines of
``submit --backend local``: tqdm bars, one per running stage, when the terminal is attached; one
plain line per finished epoch otherwise (a log file, CI, ``nohup``).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TextIO

from tqdm import tqdm

from pipeline.plan import StageSpec
from pipeline.store import CorruptFileError, StageFolders, read_pickle


@dataclass(frozen=True)
class EpochProgress:
    done: int
    total: int
    last_loss: float | None
    seconds_left: float | None

    def describe(self) -> str:
        loss = "" if self.last_loss is None else f", loss {self.last_loss:.4g}"
        eta = "" if self.seconds_left is None else f", ETA {format_duration(self.seconds_left)}"
        return f"epoch {self.done}/{self.total}{loss}{eta}"


def planned_epochs(spec: StageSpec) -> int:
    """Epochs the stage trains: its training section's, or the paraphraser's own; evaluate has none."""
    if "training" in spec.settings:
        return int(spec.settings["training"]["epochs"])
    params = spec.settings.get("method", {}).get("params", {})
    return int(params.get("paraphraser_epochs", 0))


def read_progress(spec: StageSpec, folders: StageFolders) -> EpochProgress | None:
    """The stage's progress, or None before its first epoch is logged (or for a torn read)."""
    try:
        log = read_pickle(folders.log)
        epochs = log["epochs"]
    except (FileNotFoundError, CorruptFileError, KeyError, TypeError):
        return None
    total = planned_epochs(spec)
    if not epochs or total == 0:
        return None
    mean_time = sum(entry.get("epoch_time_s", 0.0) for entry in epochs) / len(epochs)
    return EpochProgress(len(epochs), total, epochs[-1].get("train_loss"), mean_time * max(0, total - len(epochs)))


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class LiveProgress:
    """Shows the running stages of a local submit; ``update`` is called from the backend's poll loop."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self.interactive = self.stream.isatty()
        self._bars: dict[str, tqdm] = {}
        self._seen: dict[str, tuple[int, int]] = {}  # stage -> (log mtime_ns, epochs shown)

    def report(self, line: str) -> None:
        """A line that stays (a stage started, finished, failed), printed above the live bars."""
        if self.interactive:
            tqdm.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def update(self, running: dict[str, tuple[StageSpec, StageFolders]]) -> None:
        for name in [name for name in self._seen if name not in running]:
            self._seen.pop(name)
            bar = self._bars.pop(name, None)
            if bar is not None:
                bar.close()
        for name, (spec, folders) in running.items():
            try:
                mtime = folders.log.stat().st_mtime_ns
            except FileNotFoundError:
                continue
            if self._seen.get(name, (None, 0))[0] == mtime:
                continue
            progress = read_progress(spec, folders)
            shown = self._seen.get(name, (None, 0))[1]
            self._seen[name] = (mtime, progress.done if progress else shown)
            if progress is None or progress.done == shown:
                continue
            if self.interactive:
                self._bar(name, progress).update(progress.done - self._bars[name].n)
                self._bars[name].set_postfix_str(progress.describe().split(", ", 1)[-1])
            else:
                print(f"  {name}: {progress.describe()}", file=self.stream, flush=True)

    def _bar(self, name: str, progress: EpochProgress) -> tqdm:
        if name not in self._bars:
            self._bars[name] = tqdm(total=progress.total, desc=name[:48], unit="epoch", file=self.stream, leave=False)
        return self._bars[name]

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()

