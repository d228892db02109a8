"""Aggregate a sweep's results into one mean ± std table per (dataset, teacher → student, method).

The input is data, not files: a list of rows, one per (experiment, seed), each holding ``dataset``,
``teacher``, ``student``, ``method``, ``seed``, ``role`` ("teacher" | "student") and, once its stage is
done, the fields of its ``result.json``. A row without ``top1_last`` is a stage not finished yet: it is
counted as pending and shown, never dropped, so a half-run sweep cannot pass for a complete one.

Teacher rows are grouped like any other under the pair they carry (``student``); a teacher shared by
two pairs is passed once per pair. Rows that differ only in a hyper-parameter must carry distinct
``method`` labels (e.g. "kd T=4"): two results for one seed of one group are refused, not averaged.

``plan_rows`` builds those rows from a plan and the stage files: the pair's teacher label carries
the teacher-side axis values, a method's label the axis values that reach its students.

Spread is the sample standard deviation (ddof=1). With one finished seed it is undefined, so the table
shows the value alone and the CSV leaves the std cell empty, rather than a misleading ± 0.00.

Each row also carries the published top-1 of its cell, if a paper reports one (``published.json``
beside this file, each entry naming its paper and table). A cell is matched on the dataset, the
teacher and student archs and the method name, without the axis values that ``teacher_label`` and
``method_label`` append: a "kd student.lr=0.01" row is set against the paper's KD, so a variant
shows how far it lands from the published recipe.
"""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from matplotlib.figure import Figure

from pipeline import store
from pipeline.catalogue import method_names
from pipeline.graph import Experiment, Plan
from pipeline.plots import new_figure, png_bytes

IDENTITY_KEYS = ("dataset", "teacher", "student", "method", "seed", "role")
ROLES = ("teacher", "student")
TEACHER = "teacher"
VANILLA = "vanilla"
METRICS = {
    "top1_last": "top-1 last",
    "top1_best_val": "top-1 best val",
    "top5_best_val": "top-5 best val",
    "agreement_best_val": "agreement best val",
}
PLOTTED_METRIC = "top1_best_val"
PENDING = "pending"
MISSING = "-"
PUBLISHED_FILE = Path(__file__).with_name("published.json")
# Compared with the published top-1 because it is a test-set number with no epoch chosen on the test set.
COMPARED_METRIC = "top1_last"
NOTE = (
    "Accuracy (%) as mean ± sample standard deviation (ddof=1) over finished seeds; a single seed shows "
    "its value alone. *best val* is the epoch chosen on the validation split; *agreement* is the share of "
    "test images where student and teacher predict the same class. *published* is a paper's top-1 for the "
    "same data set, pair and method (sources below the table), *last − published* our top-1 last minus it."
)


class ReportError(ValueError):
    """Rows that cannot make one table (a duplicate seed, a missing key); one line for the user."""


class _Group(NamedTuple):
    dataset: str
    teacher: str
    student: str | None
    method: str


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float | None

    @classmethod
    def of(cls, values: list[float]) -> Stat | None:
        if not values:
            return None
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None)

    def __str__(self) -> str:
        return f"{self.mean:.2f}" if self.std is None else f"{self.mean:.2f} ± {self.std:.2f}"


@dataclass(frozen=True)
class Reference:
    """A published top-1 (%) for one cell, with its spread where the paper gives one."""

    top1: float
    std: float | None
    source: str
    """A key of the data file's ``sources``: the paper and table the number was read from."""

    def __str__(self) -> str:
        return f"{self.top1:.2f}" if self.std is None else f"{self.top1:.2f} ± {self.std:.2f}"


PublishedKey = tuple[str, str, str, str]
"""(dataset, teacher arch, student arch, method); method "teacher" and "vanilla" name the models trained alone."""


@dataclass(frozen=True)
class Published:
    """The published numbers of ``published.json``: references by cell, and their sources' citations."""

    references: Mapping[PublishedKey, Reference]
    sources: Mapping[str, str]


def load_published(path: Path = PUBLISHED_FILE) -> Published:
    """Read and check the data file: every entry names a source the file describes, and no cell twice."""
    data = json.loads(path.read_text(encoding="utf-8"))
    sources = {key: f"{source['paper']}, {source['table']}" for key, source in data["sources"].items()}
    references: dict[PublishedKey, Reference] = {}
    for index, entry in enumerate(data["entries"]):
        if entry.get("source") not in sources:
            raise ReportError(f"{path.name}: entries[{index}].source: {entry.get('source')!r} is not one of {', '.join(sources)}")
        key = (entry["dataset"], entry["teacher"], entry["student"], entry["method"])
        if key in references:
            raise ReportError(f"{path.name}: entries[{index}]: cell {' '.join(key)} appears twice")
        references[key] = Reference(float(entry["top1"]), entry.get("std"), entry["source"])
    return Published(references, sources)


@dataclass(frozen=True)
class ReportRow:
    """One line of the report: a method on a (dataset, pair), over its seeds."""

    dataset: str
    teacher: str
    student: str | None
    method: str
    seeds: int
    pending: int
    metrics: dict[str, Stat | None]
    parameters: int | None
    published: Reference | None = None

    @property
    def pair(self) -> str:
        return f"{self.teacher} → {self.student or MISSING}"

    @property
    def difference(self) -> float | None:
        """Ours (``COMPARED_METRIC``, mean over seeds) minus the published top-1; None if either is absent."""
        ours = self.metrics.get(COMPARED_METRIC)
        return None if ours is None or self.published is None else ours.mean - self.published.top1


def aggregate(rows: Iterable[Mapping[str, Any]], published: Published | None = None) -> list[ReportRow]:
    """Group rows, average finished seeds, and order: pairs as first seen, then teacher, vanilla, A-Z.

    Each row gets its cell's reference from ``published`` (by default the bundled ``published.json``).
    """
    references = (published or load_published()).references
    groups: dict[_Group, list[Mapping[str, Any]]] = {}
    for index, row in enumerate(rows):
        group = _group_of(index, row)
        if any(other["seed"] == row["seed"] for other in groups.get(group, [])):
            raise ReportError(
                f"report row {index}: seed {row['seed']} of {group.method} on {group.dataset} {group.teacher} → "
                f"{group.student} appears twice; give variants of a method distinct method labels"
            )
        groups.setdefault(group, []).append(row)
    pair_order = {pair: index for index, pair in enumerate(dict.fromkeys(group[:3] for group in groups))}
    ordered = sorted(groups, key=lambda group: (pair_order[group[:3]], *_method_order(group.method)))
    return [_summarise(group, groups[group], references.get(_published_key(group))) for group in ordered]


def to_markdown(table: list[ReportRow], published: Published | None = None) -> str:
    """The table, then one line per source that a published cell of it comes from."""
    headers = ["dataset", "teacher → student", "method", "n", *METRICS.values(), "params", "published", "last − published"]
    lines = ["# kdbench report", "", NOTE, "", markdown_line(headers), markdown_line(["---"] * len(headers))]
    for row in table:
        seeds = f"{row.seeds} (+{row.pending} {PENDING})" if row.pending else str(row.seeds)
        metrics = [_metric_cell(row, row.metrics[name]) for name in METRICS]
        parameters = MISSING if row.parameters is None else f"{row.parameters:,}"
        reference = MISSING if row.published is None else str(row.published)
        difference = MISSING if row.difference is None else f"{row.difference:+.2f}"
        lines.append(markdown_line([row.dataset, row.pair, row.method, seeds, *metrics, parameters, reference, difference]))
    cited = list(dict.fromkeys(row.published.source for row in table if row.published is not None))
    if cited:
        sources = (published or load_published()).sources
        lines += ["", "Published numbers:", "", *(f"- `{key}`: {sources.get(key, key)}" for key in cited)]
    return "\n".join(lines) + "\n"


def to_csv(table: list[ReportRow]) -> str:
    """One row per group; numbers are bare numbers and an absent value is an empty cell."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    metric_columns = [f"{name}_{part}" for name in METRICS for part in ("mean", "std")]
    published_columns = ["published_top1", "published_std", f"{COMPARED_METRIC}_minus_published", "published_source"]
    writer.writerow(["dataset", "teacher", "student", "method", "n", "pending", *metric_columns, "parameters", *published_columns])
    for row in table:
        reference = row.published
        cells: list[float | None] = []
        for name in METRICS:
            stat = row.metrics[name]
            cells += [None, None] if stat is None else [stat.mean, stat.std]
        writer.writerow([
            row.dataset, row.teacher, row.student or "", row.method, row.seeds, row.pending,
            *map(_number, cells), "" if row.parameters is None else row.parameters,
            *map(_number, [reference.top1, reference.std, row.difference] if reference else [None, None, None]),
            reference.source if reference else "",
        ])
    return buffer.getvalue()


def report_figure(table: list[ReportRow]) -> Figure:
    """Grouped bars of mean top-1 (best on validation) with std error bars, one group per (dataset, pair).

    The y axis starts a few points below the lowest bar: methods differ by a point or two, which a
    0-100 axis would hide.
    """
    groups = list(dict.fromkeys((row.dataset, row.pair) for row in table))
    methods = sorted({row.method for row in table}, key=_method_order)
    cells = {(row.dataset, row.pair, row.method): row.metrics[PLOTTED_METRIC] for row in table}
    width = 0.8 / max(len(methods), 1)
    figure = new_figure(width=max(6.4, 1.0 + 0.4 * len(groups) * len(methods)), height=4.5)
    axes = figure.add_subplot()
    lows = []
    for offset, method in enumerate(methods):
        stats = [cells.get((dataset, pair, method)) for dataset, pair in groups]
        heights = [math.nan if stat is None else stat.mean for stat in stats]
        errors = [math.nan if stat is None or stat.std is None else stat.std for stat in stats]
        positions = [group + (offset - (len(methods) - 1) / 2) * width for group in range(len(groups))]
        axes.bar(positions, heights, width, yerr=errors, capsize=3, label=method)
        lows += [stat.mean - (stat.std or 0.0) for stat in stats if stat is not None]
    if lows:
        axes.set_ylim(bottom=max(0.0, math.floor(min(lows)) - 5))
    axes.set_xticks(range(len(groups)), [f"{dataset}\n{pair}" for dataset, pair in groups], fontsize="small")
    axes.set_ylabel(f"{METRICS[PLOTTED_METRIC]} (%)")
    axes.grid(True, axis="y", alpha=0.3)
    if methods:
        axes.legend(fontsize="small", ncols=min(len(methods), 4))
    return figure


def write_report(table: list[ReportRow], folder: Path, sections: str = "") -> list[Path]:
    """report.md (the table, then ``sections``: more Markdown, such as the analysis), .csv and .png."""
    files = {
        folder / "report.md": (to_markdown(table) + (f"\n{sections}" if sections else "")).encode(),
        folder / "report.csv": to_csv(table).encode(),
        folder / "report.png": png_bytes(report_figure(table)),
    }
    for path, data in files.items():
        store.write_atomic(path, data)
    return list(files)


def _group_of(index: int, row: Mapping[str, Any]) -> _Group:
    for key in IDENTITY_KEYS:
        if key not in row:
            raise ReportError(f"report row {index}: missing key '{key}' (rows need {', '.join(IDENTITY_KEYS)})")
    if row["role"] not in ROLES:
        raise ReportError(f"report row {index}: role '{row['role']}' is not one of {', '.join(ROLES)}")
    method = TEACHER if row["role"] == TEACHER else row["method"]
    return _Group(row["dataset"], row["teacher"], row["student"], method)


def _published_key(group: _Group) -> PublishedKey:
    """The published cell of a group: archs and method name without the axis values the labels append."""
    return group.dataset, group.teacher.split(" [")[0], group.student or "", group.method.split(" ")[0]


def _summarise(group: _Group, rows: list[Mapping[str, Any]], reference: Reference | None) -> ReportRow:
    done = [row for row in rows if row.get("top1_last") is not None]
    metrics = {name: Stat.of([row[name] for row in done if row.get(name) is not None]) for name in METRICS}
    parameters = next((row["parameters"] for row in done if row.get("parameters") is not None), None)
    return ReportRow(*group, len(done), len(rows) - len(done), metrics, parameters, reference)


def _method_order(method: str) -> tuple[int, str]:
    """Teacher first, then the vanilla student every method is judged against, then the rest A-Z."""
    return {TEACHER: 0, VANILLA: 1}.get(method, 2), method


def _metric_cell(row: ReportRow, stat: Stat | None) -> str:
    if stat is not None:
        return str(stat)
    return PENDING if row.seeds == 0 else MISSING


def markdown_line(cells: list[str]) -> str:
    """One row of a Markdown table."""
    return "| " + " | ".join(cells) + " |"


def _number(value: float | None) -> float | str:
    return "" if value is None else round(value, 4)


STANDARD_AXES = ("dataset", "pair", "method", "seed")
TEACHER_SIDE_AXES = ("teacher.", "data.")


def teacher_label(experiment: Experiment) -> str:
    """The teacher arch plus the axis values that change the teacher, so teacher ablations stay apart."""
    extra = [f"{key}={value}" for key, value in experiment.axis_values.items() if key.startswith(TEACHER_SIDE_AXES)]
    return experiment.teacher + (f" [{', '.join(extra)}]" if extra else "")


def method_label(experiment: Experiment) -> str:
    """The method plus the other axis values that reach this method's students (not other methods' params)."""
    extra = [
        f"{key}={value}" for key, value in experiment.axis_values.items()
        if key not in STANDARD_AXES and not key.startswith(TEACHER_SIDE_AXES)
        and (not key.startswith("methods.") or key.split(".")[1] in method_names(experiment.method))
    ]
    return " ".join([experiment.method, *extra])


def plan_rows(plan: Plan, root: Path) -> list[dict]:
    """One row per experiment (student) and per teacher of each pair, with its result.json if DONE."""
    rows, seen = [], set()
    for experiment in plan.experiments:
        base = {"dataset": experiment.dataset, "teacher": teacher_label(experiment), "student": experiment.student}
        teacher_key = (experiment.teacher_evaluate_stage, base["teacher"], experiment.student)
        if teacher_key not in seen:
            seen.add(teacher_key)
            rows.append(dict(base, method="teacher", seed=0, role="teacher", **stage_result(root, experiment.teacher_evaluate_stage)))
        label = method_label(experiment)
        student_key = (experiment.evaluate_stage, base["teacher"], label)
        if student_key not in seen:  # experiments that differ only in another method's params share this stage
            seen.add(student_key)
            rows.append(dict(base, method=label, seed=experiment.seed, role="student", **stage_result(root, experiment.evaluate_stage)))
    return rows


def stage_result(root: Path, evaluate_stage: str) -> dict:
    folders = store.StageFolders(root, evaluate_stage)
    return store.read_json(folders.result) if folders.is_done() else {}
