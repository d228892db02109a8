"""Figures of an ``analyze`` stage's record: the layer-by-layer geometry of one model, a teacher and a
student side by side at one tap, and a table of student − teacher statistics across methods.

Figures come from ``pipeline.plots.new_figure``: bare ``Figure`` objects on the Agg canvas, never
pyplot, so no display is needed and a figure is freed with its last reference (there is no pyplot
registry to close it in). PNGs are rendered to bytes and written with ``store.write_atomic``, so a
reader never sees half an image.

Sizes are for reading at 100% on a laptop screen: 10 to 14 inches wide at 120 dpi, no text under 9
points.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline import store
from pipeline.plots import new_figure, png_bytes

LAYERS_FILE = "Layers.png"
GEOMETRY_PANELS = {"separation": "separation S", "information": "information I",
                   "efficiency": "efficiency E", "quality": "quality Q"}
DIMENSION_CURVES = {"pca_id": "PCA ID", "twonn": "TwoNN"}
MOST_TAP_LABELS = 30
UPRIGHT_TAP_LABELS = 10
FEW_FREQUENCIES = 4
SMALL = 9


def layer_curves(record: dict[str, Any], split: str = "train") -> Figure:
    """S, I, E and Q per tap in four panels, and the intrinsic dimension per tap in a fifth.

    The four geometry measures get a panel each because they are in different units; a shared axis
    would flatten the small ones. Taps run in forward order, so the "tunnel" (dimension rising, then
    collapsing towards the classifier) reads left to right. A tap without geometry is a gap in the
    curves; a split where no tap has geometry has nothing to draw and raises ``ValueError``
    (``save_analysis_figures`` checks ``has_geometry`` first and writes no ``Layers.png``).
    """
    taps = _split(record, split)["taps"]
    if not has_geometry(record, split):
        raise ValueError(f"{record['model_stage']}: no tap of split '{split}' has geometry; "
                         "run analyze with geometry on")
    names = [tap for tap in record["taps"] if tap in taps]
    geometries = [taps[tap]["geometry"] or {} for tap in names]
    positions = np.arange(len(names))
    figure = new_figure(14, 7.5)
    panels = figure.subplot_mosaic([["separation", "information", "dimension"],
                                    ["efficiency", "quality", "dimension"]], sharex=True)
    for key, label in GEOMETRY_PANELS.items():
        axes = panels[key]
        axes.plot(positions, [_number(geometry.get(key)) for geometry in geometries], marker="o")
        axes.set_title(label, fontsize=11)
        axes.set_ylabel(label)
    dimension = panels["dimension"]
    for key, label in DIMENSION_CURVES.items():
        dimension.plot(positions, [_number(geometry.get(key)) for geometry in geometries], marker="o", label=label)
    dimension.set_title("intrinsic dimension", fontsize=11)
    dimension.set_ylabel("intrinsic dimension")
    dimension.legend(fontsize=SMALL)
    for key, axes in panels.items():
        axes.grid(True, alpha=0.3)
        if key in ("efficiency", "quality", "dimension"):
            _tap_ticks(axes, names)
            axes.set_xlabel("tap (forward order)")
        else:
            axes.tick_params(labelbottom=False)
    figure.suptitle(f"{_model(record)} on {record['dataset']} — {split} split, "
                    f"{_split(record, split)['samples']:,} images{_geometry_samples(record, split)}\n"
                    f"{record['model_stage']}", fontsize=12)
    return figure


def tap_comparison(teacher: dict[str, Any], student: dict[str, Any], tap: str, split: str = "train",
                   student_tap: str | None = None) -> Figure:
    """Teacher and student at one tap (the teacher's ``tap`` against the student's ``student_tap``,
    when that differs): activation histograms, mean maps and Fourier spectra.

    The histograms are overlaid in the left column (one axis, so the two distributions compare
    directly) on a log density axis: after a ReLU the spike at zero is orders of magnitude above the
    tail, and a linear axis would show nothing else. The middle and right columns hold the teacher
    (top) and student (bottom) mean channel maps and log-power spectra, each with its own colour
    scale, since the two models' activations need not share a range; a student map smaller than the
    teacher's simply fills its own axes. Where neither model has maps (a (D,) tap) the figure is the
    histogram alone; where only one has, the other's map panels say so.
    """
    models = {"teacher": teacher, "student": student}
    taps = {"teacher": tap, "student": tap if student_tap is None else student_tap}
    entries = {role: _tap(record, taps[role], split) for role, record in models.items()}
    spatial = any(entry["mean_map"] is not None or entry["log_power"] is not None for entry in entries.values())
    figure = new_figure(14, 8) if spatial else new_figure(10, 6)
    if spatial:
        panels = figure.subplot_mosaic([["histogram", "teacher map", "teacher spectrum"],
                                        ["histogram", "student map", "student spectrum"]])
        histogram = panels["histogram"]
    else:
        histogram = figure.add_subplot()
    for role, record in models.items():
        entry = entries[role]
        density = np.asarray(entry["histogram"]["density"], dtype=float)
        histogram.stairs(np.where(density > 0, density, np.nan), entry["histogram"]["edges"], linewidth=1.5,
                         label=f"{role} {record['arch']} {_shape(entry)}\n"
                               f"{_split(record, split)['samples']:,} images")
    histogram.set_yscale("log")
    histogram.set_xlabel("activation value")
    histogram.set_ylabel("density (log scale)")
    histogram.set_title("activation histogram (all values of the tap)", fontsize=11)
    histogram.grid(True, alpha=0.3)
    histogram.legend(fontsize=SMALL)
    if spatial:
        for role, record in models.items():
            entry = entries[role]
            title = f"{role} {record['arch']} {_shape(entry)}"
            _mean_map(figure, panels[f"{role} map"], entry["mean_map"], f"{title}\nmean over samples and channels")
            _spectrum(figure, panels[f"{role} spectrum"], entry["log_power"],
                      f"{title}\nmean log10 power, mean removed (grey: 0 frequency)")
    where = f"tap {tap}" if taps["student"] == tap else f"teacher tap {tap} vs student tap {taps['student']}"
    figure.suptitle(f"{where}: {_model(teacher)} vs {_model(student)} on {student['dataset']} — {split} split",
                    fontsize=12)
    return figure


def statistics_heatmap(rows: list[str], columns: list[str], values: np.ndarray, title: str) -> Figure:
    """Methods (rows) by statistics (columns), coloured by student − teacher scaled per column.

    Each column is divided by its largest |value| before colouring, because the statistics have
    different units (a kurtosis difference of 3 and an IQR difference of 0.01 can matter equally);
    the colour then says which methods moved a statistic most and in which direction, while the
    annotation keeps the raw difference. NaN cells are grey and read "n/a"; an all-zero or all-NaN
    column stays uncoloured.
    """
    values = np.asarray(values, dtype=float)
    if values.shape != (len(rows), len(columns)):
        raise ValueError(f"statistics_heatmap: values have shape {values.shape}, "
                         f"rows and columns ask for {(len(rows), len(columns))}")
    scales = np.array([_largest_magnitude(values[:, column]) for column in range(len(columns))])
    scaled = values / scales
    colours = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.85")
    figure = new_figure(min(14.0, max(10.0, 3.0 + 1.3 * len(columns))), min(8.0, max(4.0, 2.5 + 0.5 * len(rows))))
    axes = figure.add_subplot()
    image = axes.imshow(np.ma.masked_invalid(scaled), cmap=colours, vmin=-1, vmax=1, aspect="auto")
    for row in range(len(rows)):
        for column in range(len(columns)):
            value = values[row, column]
            text = "n/a" if math.isnan(value) else f"{value + 0.0:.3g}"
            dark = not math.isnan(value) and abs(scaled[row, column]) > 0.6
            axes.text(column, row, text, ha="center", va="center", fontsize=SMALL + 1,
                      color="white" if dark else "black")
    axes.set_xticks(range(len(columns)), columns, rotation=30, ha="right", rotation_mode="anchor")
    axes.set_yticks(range(len(rows)), rows)
    axes.set_xlabel("statistic")
    axes.set_ylabel("method")
    axes.set_title(title, fontsize=12)
    figure.colorbar(image, ax=axes, label="student − teacher, scaled per column")
    return figure


def save_analysis_figures(record: dict[str, Any], folder: Path, teacher: dict[str, Any] | None = None,
                          split: str = "train", pairs: Sequence[tuple[str, str]] = (),
                          layers: bool = True) -> list[Path]:
    """Write ``Layers.png`` (when ``layers`` and the split has geometry) and, given the teacher's
    record, one ``Tap-*.png`` (``tap_file_name``) per (teacher tap, student tap) of ``pairs``
    (which taps match is ``report``'s rule, ``analysis_report.compared_taps``); returns the paths
    written, in that order.

    Each figure is rendered and dropped before the next is built, so one is alive at a time. Tap
    names are made safe for a file name (anything but letters, digits, ``.``, ``_``, ``+`` and ``-``
    becomes ``_``); two pairs that would share a file raise ``ValueError`` rather than overwrite.
    """
    written = []
    if layers and has_geometry(record, split):
        written.append(_write(folder / LAYERS_FILE, layer_curves(record, split)))
    if teacher is not None:
        files: dict[str, tuple[str, str]] = {}
        for teacher_tap, student_tap in pairs:
            file_name = tap_file_name(teacher_tap, student_tap)
            if file_name in files:
                raise ValueError(f"{record['model_stage']}: tap pairs {files[file_name]} and {(teacher_tap, student_tap)} "
                                 f"would both be written to {file_name}")
            files[file_name] = teacher_tap, student_tap
            written.append(_write(folder / file_name, tap_comparison(teacher, record, teacher_tap, split, student_tap)))
    return written


def has_geometry(record: dict[str, Any], split: str = "train") -> bool:
    """Whether any tap of the split carries geometry (it is None for every tap when geometry was off)."""
    return any(entry.get("geometry") is not None for entry in _split(record, split)["taps"].values())


def tap_file_name(tap: str, student_tap: str | None = None) -> str:
    """``Tap-<tap>.png``, or ``Tap-<teacher tap>-vs-<student tap>.png`` where the two differ."""
    if student_tap is None or student_tap == tap:
        return f"Tap-{safe_file_part(tap)}.png"
    return f"Tap-{safe_file_part(tap)}-vs-{safe_file_part(student_tap)}.png"


def safe_file_part(text: str) -> str:
    """``text`` with every character but letters, digits, ``.``, ``_``, ``+`` and ``-`` made ``_``."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


def _write(path: Path, figure: Figure) -> Path:
    store.write_atomic(path, png_bytes(figure))
    return path


def _split(record: dict[str, Any], split: str) -> dict[str, Any]:
    if split not in record["splits"]:
        raise ValueError(f"{record['model_stage']}: no split '{split}'; it has {', '.join(record['splits'])}")
    return record["splits"][split]


def _tap(record: dict[str, Any], tap: str, split: str) -> dict[str, Any]:
    taps = _split(record, split)["taps"]
    if tap not in taps:
        raise ValueError(f"{record['model_stage']}: no tap '{tap}' in split '{split}'; it has {', '.join(taps)}")
    return taps[tap]


def _model(record: dict[str, Any]) -> str:
    method = f" ({record['method']})" if record.get("method") else ""
    return f"{record['arch']} {record['role']}{method}"


def _shape(entry: dict[str, Any]) -> str:
    """``256×8×8`` for maps; a bare ``256`` could be misread as a map count, so ``256-vector`` for (D,)."""
    if len(entry["shape"]) == 1:
        return f"{entry['shape'][0]}-vector"
    return "×".join(str(size) for size in entry["shape"])


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def _geometry_samples(record: dict[str, Any], split: str) -> str:
    """A note when geometry used fewer images than the split has, so the title's count is not misread."""
    split_entry = _split(record, split)
    counts = {(entry.get("geometry") or {}).get("samples") for entry in split_entry["taps"].values()} - {None}
    if not counts or counts == {split_entry["samples"]}:
        return ""
    return f" (geometry on {', '.join(f'{count:,}' for count in sorted(counts))})"


def _tap_ticks(axes: Axes, names: list[str]) -> None:
    """Every tap's name, slanted for a few taps and upright past ``UPRIGHT_TAP_LABELS`` (slanted labels
    of a deep network touch in a third of the figure's width); past ``MOST_TAP_LABELS`` only every
    k-th, so labels never overlap."""
    step = max(1, math.ceil(len(names) / MOST_TAP_LABELS))
    shown = range(0, len(names), step)
    rotation = 90 if len(shown) > UPRIGHT_TAP_LABELS else 45
    axes.set_xticks(list(shown), [names[index] for index in shown], rotation=rotation, ha="right",
                    rotation_mode="anchor", fontsize=SMALL)


def _mean_map(figure: Figure, axes: Axes, mean_map: np.ndarray | None, title: str) -> None:
    axes.set_title(title, fontsize=SMALL + 1)
    if mean_map is None:
        _no_map(axes)
        return
    image = axes.imshow(mean_map, cmap="viridis", interpolation="nearest")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("column (pixel)")
    axes.set_ylabel("row (pixel)")
    figure.colorbar(image, ax=axes, label="mean activation")


def _spectrum(figure: Figure, axes: Axes, log_power: np.ndarray | None, title: str) -> None:
    """The spectrum on axes in cycles per pixel, zero frequency at the centre (the map is fftshifted).

    The zero-frequency bin is left out and drawn grey, like any non-finite bin: the maps had their
    mean removed, so that bin is log10 of (nearly) nothing and would stretch the colour scale until
    the rest is one colour. A small map gets a tick at every frequency it has.
    """
    axes.set_title(title, fontsize=SMALL + 1)
    if log_power is None:
        _no_map(axes)
        return
    shown = np.ma.masked_invalid(np.asarray(log_power, dtype=float))
    height, width = shown.shape
    shown[height // 2, width // 2] = np.ma.masked
    colours = matplotlib.colormaps["magma"].with_extremes(bad="0.6")
    image = axes.imshow(shown, cmap=colours, origin="lower", interpolation="nearest",
                        extent=(*_frequency_extent(width), *_frequency_extent(height)))
    if width <= FEW_FREQUENCIES:
        axes.set_xticks(np.fft.fftshift(np.fft.fftfreq(width)))
    if height <= FEW_FREQUENCIES:
        axes.set_yticks(np.fft.fftshift(np.fft.fftfreq(height)))
    axes.set_xlabel("horizontal frequency (cycles/pixel)")
    axes.set_ylabel("vertical frequency (cycles/pixel)")
    figure.colorbar(image, ax=axes, label="log10 power")


def _frequency_extent(size: int) -> tuple[float, float]:
    """Edges of the fftshifted frequency bins of a length-``size`` axis, in cycles per pixel."""
    frequencies = np.fft.fftshift(np.fft.fftfreq(size))
    half_bin = 0.5 / size
    return float(frequencies[0] - half_bin), float(frequencies[-1] + half_bin)


def _no_map(axes: Axes) -> None:
    axes.text(0.5, 0.5, "no spatial map:\nthis tap is a vector", ha="center", va="center",
              transform=axes.transAxes, fontsize=SMALL + 1)
    axes.set_axis_off()


def _largest_magnitude(column: np.ndarray) -> float:
    """A column's largest |value|, or 1 where it has none (all NaN) or it is all zeros, to divide by safely."""
    finite = np.abs(column[np.isfinite(column)])
    return float(finite.max()) if finite.size and finite.max() > 0 else 1.0
