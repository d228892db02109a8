"""Draw a stage's ``Loss.png`` and ``Accuracy.png`` from its ``log.pkl``.

Figures are built as bare ``matplotlib.figure.Figure`` objects on an explicit Agg canvas, never through
pyplot: pyplot would pick a display backend on a desktop and keep every figure in a global registry
until closed, which leaks memory when a report redraws hundreds of stages. A bare figure is freed with
its last reference. Each PNG is rendered to bytes first and then written atomically, so a reader never
sees half an image.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline import store
from pipeline.logfiles import accuracy_keys, term_names

LOSS_FILE = "Loss.png"
ACCURACY_FILE = "Accuracy.png"
ACCURACY_LABELS = {"train_acc": "train", "val_acc": "validation", "test_acc": "test"}


def new_figure(width: float = 6.4, height: float = 4.0) -> Figure:
    """A figure bound to the Agg canvas, so rendering needs no display and no pyplot state."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def loss_figure(log: dict[str, Any]) -> Figure:
    """Total train loss and one line per named term.

    The y axis is logarithmic when every value is positive, because terms of one method often differ
    by orders of magnitude (a feature loss with beta 1000 next to cross-entropy) and would flatten
    each other on a linear axis.
    """
    epochs = [entry["epoch"] for entry in log["epochs"]]
    series = {"train loss": [entry["train_loss"] for entry in log["epochs"]]}
    for term in term_names(log):
        series[term] = [entry["terms"].get(term, math.nan) for entry in log["epochs"]]
    figure = new_figure()
    axes = figure.add_subplot()
    for label, values in series.items():
        axes.plot(epochs, values, marker=".", label=label)
    if all(value > 0 for values in series.values() for value in values if not math.isnan(value)):
        axes.set_yscale("log")
    _decorate(axes, log, "loss")
    return figure


def accuracy_figure(log: dict[str, Any]) -> Figure | None:
    """Train/validation/test accuracy, with the epoch chosen on validation marked; None without accuracies."""
    keys = accuracy_keys(log)
    if not keys:
        return None
    epochs = [entry["epoch"] for entry in log["epochs"]]
    figure = new_figure()
    axes = figure.add_subplot()
    for key in keys:
        values = [math.nan if entry[key] is None else entry[key] for entry in log["epochs"]]
        axes.plot(epochs, values, marker=".", label=ACCURACY_LABELS[key])
    if log["best_epoch"] is not None:
        axes.axvline(log["best_epoch"], color="grey", linestyle="--", linewidth=1, label="best on validation")
    _decorate(axes, log, "accuracy (%)")
    return figure


def write_plots(log: dict[str, Any], folder: Path) -> list[Path]:
    """Write the figures this log supports into ``folder``; a log with no epochs yet has nothing to draw."""
    if not log["epochs"]:
        return []
    figures = {LOSS_FILE: loss_figure(log), ACCURACY_FILE: accuracy_figure(log)}
    written = []
    for file_name, figure in figures.items():
        if figure is not None:
            store.write_atomic(folder / file_name, png_bytes(figure))
            written.append(folder / file_name)
    return written


def _decorate(axes: Axes, log: dict[str, Any], ylabel: str) -> None:
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(ylabel)
    axes.set_title(log["name"], fontsize="medium")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
