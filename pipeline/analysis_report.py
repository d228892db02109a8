"""A sweep's analyze stages as report sections: teacher layer quality, and student − teacher statistics.

Read side only: the numbers come from each DONE analyze stage's ``analysis.json``, the figures'
arrays from its ``analysis.pkl``; nothing is recomputed and no torch is imported.

Student and teacher are compared where the sweep's ``taps`` point in each model, paired in order as
the feature methods pair ``teacher_taps`` with ``student_taps``: ``taps: [1, 2]`` compares each
model's generalised layers 1 and 2, whatever their names (a resnet20's ``layer1.0`` against a vgg8's
``layer1``). The analyze stage records what each asked tap resolved to (``asked_tap_modules``); a
stage analysed before it did is compared at the tap names both have. With ``taps`` null (every
generalised layer) the models are compared at the top-level names both have (``layer2`` of a
resnet8x4 student against ``layer2`` of its resnet32x4 teacher): ``layer1.0`` is the first of 9
blocks in a resnet56 and of 3 in a resnet20, so the same name there is not the same depth; the
last layer, the logits, is left out too. Where the two maps differ in size, the larger one's
statistics at the smaller size are taken (the analyze stage keeps them at each halving, pooled as
the feature losses pool); sizes that no halving matches (7 against 4), or a map against an
embedding, are left out and counted. A method's difference is the mean over its compared taps,
then over its seeds.

Everything is read on the training split's sample, or the test split's where only that was analysed.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import store
from pipeline.analysis_plots import safe_file_part, save_analysis_figures, statistics_heatmap
from pipeline.graph import Plan
from pipeline.plots import png_bytes
from pipeline.report import markdown_line, method_label, teacher_label

STATISTICS = ("std", "cv", "skew", "excess_kurtosis", "iqr", "wavelet_high_ratio", "spectral_entropy",
              "lowpass_residual_ratio")
GEOMETRY = ("separation", "information", "efficiency", "quality", "pca_id", "twonn")
GEOMETRY_HEADERS = ("S", "I", "E", "Q", "PCA ID", "TwoNN")
RANKED_SPLIT = "train"
"""The split the tables read, where it was analysed (else the test split)."""


def read_analysis(root: Path, stage: str | None) -> dict[str, Any] | None:
    """A DONE analyze stage's numbers, or None (no such stage, or not done yet)."""
    if stage is None:
        return None
    folders = store.StageFolders(root, stage)
    return store.read_json(folders.analysis_numbers) if folders.is_done() else None


def split_of(*analyses: Mapping[str, Any]) -> str | None:
    """The split the tables read for these analyses: ``RANKED_SPLIT`` where they all have it, else
    another they all have, else None."""
    shared = [split for split in analyses[0]["splits"] if all(split in numbers["splits"] for numbers in analyses)]
    return RANKED_SPLIT if RANKED_SPLIT in shared else next(iter(shared), None)


def ranked_layers(numbers: Mapping[str, Any], split: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(tap, geometry) of every tap with geometry, highest quality Q first (forward order breaks ties)."""
    taps = numbers["splits"][split or split_of(numbers)]["taps"]
    scored = [(tap, taps[tap]["geometry"]) for tap in numbers["taps"] if (taps[tap].get("geometry") or {}).get("quality") is not None]
    return sorted(scored, key=lambda item: -item[1]["quality"])


def top_layers(numbers: Mapping[str, Any], top: int, split: str | None = None) -> list[str]:
    """The ``top`` feature-map taps by Q, in forward order: feature_only distils (C, H, W) maps (not
    the pooled embedding or the logits) and pairs teacher and student taps in order."""
    split = split or split_of(numbers)
    shapes = {tap: entry["shape"] for tap, entry in numbers["splits"][split]["taps"].items()}
    maps = [tap for tap, _ in ranked_layers(numbers, split) if len(shapes[tap]) == 3]
    best = set(maps[:top])
    return [tap for tap in numbers["taps"] if tap in best]


def layer_quality_markdown(numbers: Mapping[str, Any], split: str) -> list[str]:
    """One analysed model's per-tap geometry as a Markdown table, in forward order."""
    part = numbers["splits"][split]
    lines = [f"### {numbers['arch']} {numbers['role']} on {numbers['dataset']} ({split} split, "
             f"{part['samples']:,} images, {part['per_class']} per class; stage {numbers['model_stage']})", "",
             markdown_line(["tap", "shape", *GEOMETRY_HEADERS]), markdown_line(["---"] * (2 + len(GEOMETRY)))]
    for tap in numbers["taps"]:
        entry = part["taps"][tap]
        geometry = entry.get("geometry") or {}
        lines.append(markdown_line([tap, "x".join(map(str, entry["shape"])), *(_cell(geometry.get(key)) for key in GEOMETRY)]))
    return lines


TapPair = tuple[str, str]
"""(teacher tap, student tap): where a student is compared with its teacher."""


def tap_differences(student: Mapping[str, Any], teacher: Mapping[str, Any], split: str) -> tuple[dict[TapPair, dict[str, float | None]], int]:
    """Student − teacher statistics at each compared tap pair, at the smaller map size; and how many
    pairs with statistics on both sides could not be compared (sizes no halving matches, or a map
    against an embedding)."""
    student_taps, teacher_taps = student["splits"][split]["taps"], teacher["splits"][split]["taps"]
    differences, skipped = {}, 0
    for teacher_tap, student_tap in compared_taps(student, teacher):
        if student_taps[student_tap].get("stats") is None or teacher_taps[teacher_tap].get("stats") is None:
            continue
        pair = _at_common_size(student_taps[student_tap], teacher_taps[teacher_tap])
        if pair is None:
            skipped += 1
            continue
        mine, theirs = pair
        differences[teacher_tap, student_tap] = {
            key: None if mine.get(key) is None or theirs.get(key) is None else mine[key] - theirs[key] for key in STATISTICS}
    return differences, skipped


def compared_taps(student: Mapping[str, Any], teacher: Mapping[str, Any]) -> list[TapPair]:
    """The (teacher tap, student tap) pairs student and teacher are compared at (module docstring):
    the asked taps paired in order where both stages recorded what they resolved to, in that
    order; else the shared names, in the student's forward order: every shared one where the sweep
    named taps, the shared top-level layers but the logits where it did not."""
    asked = student.get("taps_asked"), teacher.get("taps_asked")
    if None not in asked:
        resolved = student.get("asked_tap_modules"), teacher.get("asked_tap_modules")
        if asked[0] == asked[1] and None not in resolved:
            return list(dict.fromkeys(zip(resolved[1], resolved[0])))
        return [(tap, tap) for tap in student["taps"] if tap in teacher["taps"]]
    logits = {student["taps"][-1], teacher["taps"][-1]}
    return [(tap, tap) for tap in student["taps"] if tap in teacher["taps"] and "." not in tap and tap not in logits]


def _at_common_size(student: Mapping[str, Any], teacher: Mapping[str, Any]) -> tuple[dict, dict] | None:
    if len(student["shape"]) != len(teacher["shape"]):
        return None
    if len(student["shape"]) != 3:
        return student["stats"], teacher["stats"]
    sizes = [tuple(entry["shape"][1:]) for entry in (student, teacher)]
    smaller = min(sizes, key=lambda size: size[0] * size[1])
    key = f"{smaller[0]}x{smaller[1]}"
    chosen = [entry["stats"] if size == smaller else entry.get("stats_at", {}).get(key) for entry, size in zip((student, teacher), sizes)]
    return None if None in chosen else (chosen[0], chosen[1])


@dataclass
class _Comparison:
    """One (dataset, pair)'s methods, each with its per-seed mean differences."""

    dataset: str
    pair: str
    split: str
    samples: int
    seeds: dict[str, list[dict[str, float | None]]]
    compared: dict[str, int]
    skipped: dict[str, int]


def _comparisons(plan: Plan, root: Path) -> list[_Comparison]:
    """Per (dataset, teacher label, student): each method's per-seed differences, where student and
    teacher both have statistics at some tap pair (a pair no size matched counts: its row says so)."""
    found: dict[tuple[str, str], _Comparison] = {}
    seen = set()
    for experiment in plan.experiments:
        teacher = read_analysis(root, experiment.teacher_analyze_stage)
        student = read_analysis(root, experiment.student_analyze_stage)
        split = None if teacher is None or student is None else split_of(teacher, student)
        if split is None:
            continue
        pair = f"{teacher_label(experiment)} → {experiment.student}"
        method = method_label(experiment)
        if (pair, experiment.student_analyze_stage, method) in seen:
            continue
        seen.add((pair, experiment.student_analyze_stage, method))
        differences, skipped = tap_differences(student, teacher, split)
        if not differences and not skipped:  # statistics off, or no tap to compare
            continue
        comparison = found.setdefault((experiment.dataset, pair), _Comparison(
            experiment.dataset, pair, split, teacher["splits"][split]["samples"], {}, {}, {}))
        comparison.seeds.setdefault(method, []).append(
            {key: _mean([taps[key] for taps in differences.values()]) for key in STATISTICS})
        # the same architectures at every seed: the counts are the method's, not a seed's
        comparison.compared[method] = len(differences)
        comparison.skipped[method] = skipped
    return list(found.values())


def analysis_markdown(plan: Plan, root: Path) -> str:
    """The report's analysis sections (empty when the sweep analyses nothing, or nothing is done yet)."""
    lines: list[str] = []
    teachers = dict.fromkeys(experiment.teacher_analyze_stage for experiment in plan.experiments)
    quality = [numbers for numbers in (read_analysis(root, stage) for stage in teachers)
               if numbers is not None and ranked_layers(numbers)]
    if quality:
        lines += ["## Layer quality of the teachers", "",
                  "Latent geometry per tap (feature-only KD's scores, `analysis/geometry.py`): separation S, "
                  "information I, efficiency E, quality Q = S + sqrt(I·E), and intrinsic dimension (PCA at 95% "
                  "variance, TwoNN). `python runner.py layers-quality SWEEP` ranks the taps by Q.", ""]
        for numbers in quality:
            lines += [*layer_quality_markdown(numbers, split_of(numbers)), ""]
    comparisons = _comparisons(plan, root)
    if comparisons:
        lines += ["## Feature statistics, student − teacher", "",
                  "Per statistic (`analysis/feature_stats.py`), the student's value minus its teacher's on one "
                  "sample of images, at the taps the sweep named, paired in order as the feature methods pair "
                  "`teacher_taps` with `student_taps` (at the top-level layer names both have but the logits, "
                  "when it named none), the larger map pooled to the smaller size; averaged over those taps and "
                  "then over seeds. *taps* counts the compared taps (and, after +, those no size matched).", ""]
        for comparison in comparisons:
            lines += [f"### {comparison.dataset}, {comparison.pair} ({comparison.split} split, {comparison.samples:,} images)",
                      "", markdown_line(["method", "n", "taps", *STATISTICS]), markdown_line(["---"] * (3 + len(STATISTICS)))]
            for method, seeds in comparison.seeds.items():
                means = [_mean([seed[key] for seed in seeds]) for key in STATISTICS]
                taps = f"{comparison.compared[method]}" + (f" (+{comparison.skipped[method]})" if comparison.skipped[method] else "")
                lines.append(markdown_line([method, str(len(seeds)), taps, *map(_cell, means)]))
            lines.append("")
    return "\n".join(lines)


def write_analysis_figures(plan: Plan, root: Path, folder: Path) -> list[Path]:
    """Per (dataset, pair): ``statistics-<dataset>-<pair>.png``, the methods x statistics heatmap; per
    (dataset, pair, method), its first analysed seed against the teacher at each compared tap, in
    ``taps-<dataset>-<pair>-<method>/``. The pair is the report's teacher label and student."""
    written = []
    for comparison in _comparisons(plan, root):
        methods = list(comparison.seeds)
        values = np.array([[_nan(_mean([seed[key] for seed in comparison.seeds[method]])) for key in STATISTICS]
                           for method in methods])
        seeds = max(len(seeds) for seeds in comparison.seeds.values())
        title = (f"{comparison.dataset}, {comparison.pair}: student − teacher, mean over matching taps and seeds "
                 f"({comparison.split} split, {comparison.samples:,} images, up to {seeds} seed{'s' if seeds > 1 else ''})")
        path = folder / f"statistics-{_file_part(comparison.dataset)}-{_file_part(comparison.pair)}.png"
        store.write_atomic(path, png_bytes(statistics_heatmap(methods, list(STATISTICS), values, title)))
        written.append(path)
    drawn = set()
    for experiment in plan.experiments:
        if experiment.teacher_analyze_stage is None or experiment.student_analyze_stage is None:
            continue
        pair = f"{teacher_label(experiment)}-{experiment.student}"
        key = (experiment.dataset, pair, method_label(experiment))
        if key in drawn:
            continue
        teacher, student = (_record(root, stage) for stage in (experiment.teacher_analyze_stage, experiment.student_analyze_stage))
        split = None if teacher is None or student is None else split_of(teacher, student)
        if split is None:
            continue
        drawn.add(key)
        target = folder / f"taps-{_file_part(experiment.dataset)}-{_file_part(pair)}-{_file_part(key[2])}"
        written += save_analysis_figures(student, target, teacher=teacher, split=split,
                                         pairs=compared_taps(student, teacher), layers=False)
    return written


def _record(root: Path, stage: str) -> dict[str, Any] | None:
    folders = store.StageFolders(root, stage)
    return store.read_pickle(folders.analysis_record) if folders.is_done() else None


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [value for value in values if value is not None and not math.isnan(value)]
    return statistics.fmean(kept) if kept else None


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _cell(value: float | int | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _file_part(text: str) -> str:
    return safe_file_part(text.replace(" → ", "-"))
