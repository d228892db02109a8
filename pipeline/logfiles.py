"""Read a stage's ``log.pkl`` and show it as a table a person can scan.

The read side never imports torch or the training code: a log is plain Python data (floats, strings,
dicts), so ``runner.py logs`` works on a laptop that only copied ``logs/`` back from the cluster.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline import store

LOG_FILE = "log.pkl"
LOG_KEYS = ("format", "stage", "name", "environment", "epochs", "best_epoch", "status")
EPOCH_KEYS = ("epoch", "train_loss", "terms", "train_acc", "val_acc", "test_acc", "lr", "epoch_time_s")
ACCURACY_KEYS = ("train_acc", "val_acc", "test_acc")
MISSING = "-"


class LogError(RuntimeError):
    """A log that is absent or lacks what the read side needs; the message names the file."""


def read_log(path: Path) -> dict[str, Any]:
    """Load a log from a stage folder in ``logs/`` or from the ``log.pkl`` path itself.

    Keys are checked here, once, so that formatting and plotting can index freely and a log from an
    older writer fails with the file and key named rather than a KeyError deep in a plot.
    """
    file = path / LOG_FILE if path.is_dir() else path
    if not file.is_file():
        started = (file.parent / "config.json").is_file()
        raise LogError(f"{file}: no such log; " + (store.repair_advice(file) if started else "the stage has not started"))
    log = store.read_pickle(file)
    if not isinstance(log, dict):
        raise LogError(f"{file}: expected a dict, found {type(log).__name__}")
    for key in LOG_KEYS:
        if key not in log:
            raise LogError(f"{file}: missing key '{key}' (a log holds {', '.join(LOG_KEYS)})")
    for entry in log["epochs"]:
        for key in EPOCH_KEYS:
            if key not in entry:
                raise LogError(f"{file}: epoch {entry.get('epoch', '?')} is missing key '{key}'")
    return log


def term_names(log: dict[str, Any]) -> list[str]:
    """Loss term names in the order they first appear, so columns and plot lines match the method."""
    names: dict[str, None] = {}
    for entry in log["epochs"]:
        names.update(dict.fromkeys(entry["terms"]))
    return list(names)


def accuracy_keys(log: dict[str, Any]) -> list[str]:
    """The accuracy series this log holds; the paraphraser stage, which has no classifier, holds none."""
    return [key for key in ACCURACY_KEYS if any(entry[key] is not None for entry in log["epochs"])]


def format_log(log: dict[str, Any]) -> str:
    """The per-epoch table followed by a summary; ``*`` marks the epoch chosen on validation."""
    return _epoch_table(log) + "\n\n" + _summary(log)


def _epoch_table(log: dict[str, Any]) -> str:
    terms = term_names(log)
    accuracies = accuracy_keys(log)
    headers = ["epoch", "train loss", *terms, *(key.replace("_", " ") for key in accuracies), "lr", "time (s)"]
    rows = []
    for entry in log["epochs"]:
        marker = "*" if entry["epoch"] == log["best_epoch"] else " "
        rows.append([
            f"{entry['epoch']}{marker}",
            _number(entry["train_loss"], ".4f"),
            *(_number(entry["terms"].get(term), ".4f") for term in terms),
            *(_number(entry[key], ".2f") for key in accuracies),
            _number(entry["lr"], ".4g"),
            _number(entry["epoch_time_s"], ".1f"),
        ])
    return _align(headers, rows)


def _summary(log: dict[str, Any]) -> str:
    epochs = log["epochs"]
    lines = [
        f"stage: {log['stage']}   name: {log['name']}   status: {log['status']}",
        f"epochs run: {len(epochs)}   total time: {_duration(sum(entry['epoch_time_s'] for entry in epochs))}",
    ]
    best = next((entry for entry in epochs if entry["epoch"] == log["best_epoch"]), None)
    if best is not None:
        lines.append(
            f"best epoch (on validation): {best['epoch']}   "
            f"val acc {_number(best['val_acc'], '.2f')}   test acc {_number(best['test_acc'], '.2f')}"
        )
    if epochs and epochs[-1]["test_acc"] is not None:
        lines.append(f"last test acc: {_number(epochs[-1]['test_acc'], '.2f')}")
    if log.get("resumed_after_epochs"):
        lines.append("resumed from its checkpoint after epoch(s): " + ", ".join(map(str, log["resumed_after_epochs"])))
    lines.append("environment: " + ", ".join(f"{key} {value}" for key, value in log["environment"].items()))
    if log.get("result"):
        lines.append("result: " + ", ".join(f"{key} {_value(value)}" for key, value in log["result"].items()))
    return "\n".join(lines)


def _align(headers: list[str], rows: list[list[str]]) -> str:
    """Right-aligned plain-text columns: numbers line up on the decimal point when decimals agree."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in [headers, *rows])


def _number(value: float | None, spec: str) -> str:
    return MISSING if value is None else format(value, spec)


def _value(value: Any) -> str:
    if value is None:
        return MISSING
    return format(value, ".2f") if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {seconds:02d}s" if hours else f"{minutes}m {seconds:02d}s"
