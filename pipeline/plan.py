"""Sweep file -> stage graph: one experiment per combination of axis values, one stage per distinct hash.

A stage's hash covers exactly what its output depends on, plus its upstream stages' hashes:

* prepare_data (data sets declared ``prepared``: folders of JPEGs): dataset name and fingerprint. It
  is an upstream of every stage that reads the data set but not part of their hashes: its whole
  identity, the fingerprint, is in their settings already, and CIFAR sweeps planned before it existed
  keep their hashes. Splits are not in it: it holds the official parts, shared by every split seed;
* train_teacher: dataset (name, val_fraction, split_seed, fingerprint), teacher arch, teacher training settings
  (with ``init``'s identity, not its path: ``pipeline/initial_weights.py``);
  ``data.subset_size`` reaches only the student (few-data distillation from a fully trained teacher),
  and only when set, so sweeps without it keep their hashes;
* pretrain_paraphraser: teacher hash, method name and the params its pre-stage declares;
* teacher_outputs (``teacher_cache.enabled``, for a student whose every teacher-reading part is
  ``teacher_outputs_only``, without teacher taps unless ``teacher_cache.features``): teacher hash,
  the student's data set (subset included), augmentation, cache dtype, ``top_k`` and the teacher
  taps when set, and, with augmentation on, the student's seed, batch size and epochs (they fix the
  batches it replays); without augmentation a teacher's outputs of an image are one row, shared by
  every seed and batch size. The student reads it beside its teacher, so a cached student has its
  own hash;
* train_student: dataset, student arch, student training settings (seed included), method name and
  all its params (every part's, for a composition such as ``crd+kd``), and the teacher / paraphraser hashes only when the method reads them, so a
  vanilla student is shared by every pair with its architecture and never retrains for a teacher;
* evaluate: the evaluated model's hash and the reference teacher's;
* analyze (``analysis.stats`` or ``analysis.geometry`` on): the analysed model's hash, the data set
  without the student's ``subset_size`` (teacher and student are looked at on the same images) and
  the analysis settings that change a number (all but ``ANALYSIS_UNHASHED``; the legacy switches
  only with geometry on, the splits in one order); one per teacher and one per
  student, so a vanilla student shared by several pairs is analysed once.

Runtime settings (data_root and ``sweep_schema.RUNTIME``: device, amp, channels_last, compile,
cudnn_benchmark) and the evaluation and analysis batch sizes are not hashed: they change where or how fast a
stage runs, not what it computes. What the data files hold is hashed, as the
dataset's ``fingerprint`` (``data/files.py``): the same files in another folder give the same
stages, other files give other stages. A stage shared by several experiments keeps the settings
and runtime of the first experiment that needs it.

Planning imports no torch and reads no disk beyond the sweep file, the catalogue's sources and,
once per data set, the data files' sizes and mtimes (their content only when the fingerprint
cache beside them does not know them yet).
"""
from __future__ import annotations

import copy
import itertools
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

from pipeline.catalogue import (
    Catalogue,
    DatasetSpec,
    MethodSpec,
    dataset_fingerprint,
    load_catalogue,
    method_names,
)
from pipeline.graph import Experiment, Plan, StageSpec
from pipeline.hashing import content_hash
from pipeline.initial_weights import hashed_init, resolve_init
from pipeline.sweep import Sweep, SweepError, load_sweep
from pipeline.sweep_schema import ANALYSIS_SPLITS, RUNTIME_KEYS, SECTIONS

__all__ = ["Experiment", "Plan", "StageSpec", "build_plan", "expand"]

ANALYSIS_UNHASHED = ("models", "batch_size", *RUNTIME_KEYS)
"""Analysis settings that change how an analyze stage gets its numbers, or which stages exist, not
the numbers: every other analysis key is hashed, a key added later included."""

_GROUPS = ("data", "teacher", "teacher_evaluate", "paraphraser", "teacher_outputs", "student", "evaluate", "analyze")
"""Stage groups in the order the plan lists them; the order is topological."""


def build_plan(sweep_path: str | os.PathLike, repo_root: str | os.PathLike | None = None) -> Plan:
    """Reads, checks and expands the sweep at ``sweep_path`` against the catalogue of ``repo_root``.

    Raises SweepError for a bad sweep, CatalogueError for a bad METHOD/ARCHITECTURES/DATASETS and
    DatasetError for data files under data_root that are missing or unreadable.
    """
    catalogue = load_catalogue(repo_root)
    return expand(load_sweep(sweep_path, catalogue), catalogue)


def expand(sweep: Sweep, catalogue: Catalogue) -> Plan:
    """The stage graph of a checked sweep."""
    graph = _GraphBuilder(sweep, catalogue)
    experiments = tuple(graph.add_experiment(values) for values in _combinations(sweep.axes))
    graph.check_teacher_cache()
    return Plan(sweep.name, sweep.path, graph.stages(), experiments)


def _combinations(axes: Mapping[str, tuple[Any, ...]]) -> Iterator[dict[str, Any]]:
    """Every combination of axis values, the last axis varying fastest."""
    for values in itertools.product(*axes.values()):
        yield dict(zip(axes, values))


class _GraphBuilder:
    """Turns combinations into stages, keeping one stage per hash in each group."""

    def __init__(self, sweep: Sweep, catalogue: Catalogue):
        self.sweep = sweep
        self.catalogue = catalogue
        self.groups: dict[str, dict[str, StageSpec]] = {group: {} for group in _GROUPS}
        self.fingerprints: dict[str, str] = {}
        self.dataset_facts: dict[str, DatasetSpec] = {}
        self.cache_asked = False

    def stages(self) -> dict[str, StageSpec]:
        """All stages by name, in group order; two stages whose names collide is an error."""
        stages: dict[str, StageSpec] = {}
        for group in _GROUPS:
            for stage in self.groups[group].values():
                if stage.name in stages:
                    raise RuntimeError(f"stages {stages[stage.name].hash} and {stage.hash} share the name {stage.name}")
                stages[stage.name] = stage
        return stages

    def add_experiment(self, values: dict[str, Any]) -> Experiment:
        parts = [self.catalogue.methods[name] for name in method_names(values["method"])]
        sections, params = self._resolve(values, parts)
        dataset_name, seed = values["dataset"], values["seed"]
        teacher_arch, student_arch = values["pair"].split(":")
        data = dict(sections["data"])
        subset_size = data.pop("subset_size", None)
        dataset = {"name": dataset_name, **data, "fingerprint": self._fingerprint(dataset_name)}
        # Few-data distillation trains the student alone on a subset; its teacher keeps the whole split.
        student_dataset = dataset if subset_size is None else {**dataset, "subset_size": subset_size}
        student_method = method_settings(values["method"], parts, params)
        uses_teacher = any(part.uses_teacher for part in parts)
        pre_staged = self._pre_staged_part(values, parts, params)
        data_stage = self._data_stage(dataset)

        teacher_training, teacher_hashed = self._training(sections["teacher"], "teacher")
        teacher = self._stage(
            "teacher", "train_teacher", [dataset_name, teacher_arch],
            settings={"dataset": dataset, "arch": teacher_arch, "training": teacher_training},
            upstream={},
            runtime=self._runtime(sections["teacher"]),
            hashed={"dataset": dataset, "arch": teacher_arch, "training": teacher_hashed},
            data=data_stage,
        )
        evaluation = {"dataset": dataset, "batch_size": sections["evaluate"]["batch_size"]}
        evaluation_runtime = self._runtime(sections["evaluate"])
        teacher_evaluate = self._stage(
            "teacher_evaluate", "evaluate", [dataset_name, teacher_arch, "teacher"],
            settings=evaluation, upstream={"model": teacher}, runtime=evaluation_runtime, hashed={}, data=data_stage,
        )
        paraphraser = None
        if pre_staged is not None:
            # Only the params the pre-stage depends on: a shared paraphraser must not show the
            # first FT run's beta or student tap as if they had shaped it.
            pre_stage_params = {key: params[pre_staged.name][key] for key in pre_staged.pre_stage.params}
            paraphraser = self._stage(
                "paraphraser", pre_staged.pre_stage.kind, [dataset_name, teacher_arch],
                settings={"dataset": dataset, "teacher_arch": teacher_arch, "method": {
                    "name": pre_staged.name, "params": pre_stage_params}},
                upstream={"teacher": teacher},
                runtime=self._runtime(sections["student"]),
                hashed={"method": pre_staged.name, "params": pre_stage_params},
                data=data_stage,
            )
        student_upstream = {"teacher": teacher} if uses_teacher else {}
        if paraphraser is not None:
            student_upstream["paraphraser"] = paraphraser
        run = [dataset_name, student_arch, values["method"], f"s{seed}"]
        student_training, student_hashed = self._training(sections["student"], "student")
        cache = sections["teacher_cache"]
        self.cache_asked |= bool(cache["enabled"])
        readers = [part for part in parts if part.uses_teacher]
        chosen = cache["methods"] is None or values["method"] in cache["methods"]
        if cache["enabled"] and chosen and readers and all(part.teacher_outputs_only for part in readers) and (
                cache["features"] or all(part.logits_only for part in readers)):
            taps = [tap for part in readers for key in part.teacher_tap_params for tap in _listed(params[part.name][key])]
            student_upstream["teacher_outputs"] = self._teacher_outputs(
                teacher, teacher_arch, student_dataset, {**student_training, "seed": seed}, cache, sections["student"],
                list(dict.fromkeys(taps)),
            )
        student_settings = {"dataset": student_dataset, "arch": student_arch, "method": student_method}
        student = self._stage(
            "student", "train_student", run,
            settings={**student_settings, "training": {**student_training, "seed": seed}},
            upstream=student_upstream,
            runtime=self._runtime(sections["student"]),
            hashed={**student_settings, "training": {**student_hashed, "seed": seed}},
            data=data_stage,
        )
        evaluate = self._stage(
            "evaluate", "evaluate", run,
            settings=evaluation, upstream={"model": student, "teacher": teacher}, runtime=evaluation_runtime, hashed={},
            data=data_stage,
        )
        analysis = sections["analysis"]
        analyzes: dict[str, StageSpec] = {}
        if analysis["stats"] or analysis["geometry"]:
            models = {"teacher": (teacher, teacher_arch, [dataset_name, teacher_arch, "teacher"], None),
                      "student": (student, student_arch, run, values["method"])}
            for role in analysis["models"]:
                model, arch, readable, method = models[role]
                analyzes[role] = self._analyze(model, arch, role, method, dataset, analysis, readable, data_stage)
        return Experiment(
            dataset=dataset_name,
            teacher=teacher_arch,
            student=student_arch,
            method=values["method"],
            seed=seed,
            axis_values=dict(values),
            teacher_stage=teacher.name,
            teacher_evaluate_stage=teacher_evaluate.name,
            paraphraser_stage=None if paraphraser is None else paraphraser.name,
            student_stage=student.name,
            evaluate_stage=evaluate.name,
            teacher_analyze_stage=analyzes["teacher"].name if "teacher" in analyzes else None,
            student_analyze_stage=analyzes["student"].name if "student" in analyzes else None,
        )

    def _analyze(
        self, model: StageSpec, arch: str, role: str, method: str | None, dataset: Mapping[str, Any],
        analysis: Mapping[str, Any], readable: list[str], data: StageSpec | None,
    ) -> StageSpec:
        """The stage that looks inside the model ``model`` trained (stages/analyze.py)."""
        hashed_analysis = {key: value for key, value in analysis.items() if key not in ANALYSIS_UNHASHED}
        hashed_analysis["splits"] = [split for split in ANALYSIS_SPLITS if split in analysis["splits"]]
        if not analysis["geometry"]:  # the geometry's legacy switches change nothing then
            hashed_analysis = {key: value for key, value in hashed_analysis.items() if not key.startswith("legacy_")}
        hashed = {"dataset": dict(dataset), "analysis": hashed_analysis}
        settings = {**hashed, "arch": arch, "role": role, "student_method": method, "batch_size": analysis["batch_size"]}
        return self._stage("analyze", "analyze", readable, settings=settings, upstream={"model": model},
                           runtime=self._runtime(analysis), hashed=hashed, data=data)

    def _teacher_outputs(
        self, teacher: StageSpec, teacher_arch: str, dataset: Mapping[str, Any], training: Mapping[str, Any],
        cache: Mapping[str, Any], runtime_section: Mapping[str, Any], taps: list[str | int],
    ) -> StageSpec:
        """The stage that runs ``teacher`` once over the batches a student with ``training`` sees,
        keeping its logits and the features at ``taps``."""
        augment = bool(training["augment"])
        replayed = {"seed": training["seed"], "batch_size": training["batch_size"], "epochs": training["epochs"]}
        top_k = cache["top_k"]
        # top_k and taps are left out when unset: caches planned before they existed keep their hashes
        hashed = {"dataset": dict(dataset), "augment": augment, "dtype": cache["dtype"], **(replayed if augment else {}),
                  **({"top_k": top_k} if top_k is not None else {}), **({"taps": taps} if taps else {})}
        spec = self._dataset_facts(dataset["name"])
        if top_k is not None and top_k >= spec.num_classes:
            raise SweepError(self.sweep.path, "defaults.teacher_cache.top_k",
                             f"{top_k} keeps every one of {dataset['name']}'s {spec.num_classes} classes; "
                             "set null to cache all logits", [f"1..{spec.num_classes - 1}", "null"])
        rows = (training["epochs"] if augment else 1) * spec.training_split_size(
            float(dataset["val_fraction"]), dataset.get("subset_size"))
        value_bytes = 2 if cache["dtype"] == "float16" else 4
        # top-k: k values, k int16 classes and a float32 stand-in logit per sample
        size = rows * (spec.num_classes * value_bytes if top_k is None else top_k * (value_bytes + 2) + 4)
        size += rows * value_bytes * _feature_values(teacher_arch, spec, taps)
        settings = {**hashed, "teacher_arch": teacher_arch, "training": dict(training), "bytes": size}
        readable = [dataset["name"], teacher_arch, *([f"s{training['seed']}"] if augment else ["once"]),
                    *(["features"] if taps else [])]
        return self._stage(
            "teacher_outputs", "teacher_outputs", readable, settings=settings, upstream={"teacher": teacher},
            runtime=self._runtime(runtime_section), hashed=hashed, data=self._data_stage(dataset),
        )

    def check_teacher_cache(self) -> None:
        """SweepError when ``teacher_cache.enabled`` caches nothing, or more than ``teacher_cache.limit_gb``."""
        stages = self.groups["teacher_outputs"].values()
        if self.cache_asked and not stages:
            readable = sorted(name for name, method in self.catalogue.methods.items() if method.teacher_outputs_only)
            logits_only = sorted(name for name, method in self.catalogue.methods.items() if method.logits_only)
            raise SweepError(self.sweep.path, "defaults.teacher_cache.enabled",
                             "no method of this sweep reads only the teacher's logits (or, with features: true, its "
                             f"logits and tapped features: {', '.join(readable)}), so nothing can be cached", logits_only)
        total = sum(stage.settings["bytes"] for stage in stages)
        limit = float(self.sweep.defaults["teacher_cache"]["limit_gb"])
        if total > limit * 1e9:
            raise SweepError(self.sweep.path, "defaults.teacher_cache.limit_gb",
                             f"the teacher cache would hold {total / 1e9:.2f} GB in {len(stages)} stage(s), above "
                             f"the limit of {limit:g} GB; raise the limit, use dtype float16, top_k or fewer epochs")

    def _pre_staged_part(
        self, values: Mapping[str, Any], parts: list[MethodSpec], params: Mapping[str, Mapping[str, Any]]
    ) -> MethodSpec | None:
        """The part whose pre-stage this experiment needs; two such parts is a SweepError (a student
        reads one pre-stage)."""
        needing = [part for part in parts if part.pre_stage is not None and part.pre_stage.needed(params[part.name])]
        if len(needing) > 1:
            kinds = ", ".join(f"{part.name} ({part.pre_stage.kind})" for part in needing)
            raise SweepError(self.sweep.path, "axes.method", f"{values['method']!r} combines methods that each need a "
                             f"pre-stage here: {kinds}; a student has one pre-stage, so combine at most one of them")
        return needing[0] if needing else None

    def _resolve(
        self, values: Mapping[str, Any], parts: list[MethodSpec]
    ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """The sections, and each method part's params, of one combination: defaults, then a
        composition's own values for its parts (``defaults.methods.crd+kd.kd``), then the dotted axis
        values (``methods.<part>.<key>`` sets that part in every composition it is in)."""
        sections = {section: dict(self.sweep.defaults[section]) for section in SECTIONS}
        composition = self.sweep.defaults["compositions"].get(values["method"], {})
        params = {part.name: {**self.sweep.defaults["methods"][part.name], **composition.get(part.name, {})} for part in parts}
        for key, value in values.items():
            head, _, rest = key.partition(".")
            if head in sections:
                sections[head][rest] = value
            elif head == "methods":
                owner, _, param = rest.partition(".")
                if owner in params:
                    params[owner][param] = value
        return sections, {part.name: {key: params[part.name][key] for key in part.params} for part in parts}

    def _training(self, section: Mapping[str, Any], role: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """A training section as its stage reads it, and the part of it that goes into the hash.

        The stage reads a resolved ``init`` (absolute paths, a checkpoint's sha256); the hash takes
        what the weights are, not where they lie. Scratch and a ``backbone_lr_scale`` of 1 are left
        out of the hash, so stages planned before these keys existed keep their hashes; so is every
        training setting of a teacher that trains 0 epochs (it is its imported weights).
        """
        training = _hashed_training(section)
        hashed = {key: value for key, value in training.items() if key != "init"}
        if hashed.get("backbone_lr_scale") == 1.0:
            del hashed["backbone_lr_scale"]
        try:
            resolved = resolve_init(training.pop("init"), os.path.dirname(self.sweep.path))
        except OSError as error:
            raise SweepError(self.sweep.path, f"{role}.init", f"cannot read the checkpoint: {error}") from None
        if resolved is not None:
            training["init"] = resolved
            hashed["init"] = hashed_init(resolved)
            if training["epochs"] == 0:
                hashed = {"epochs": 0, "init": hashed["init"]}
        return training, hashed

    def _data_stage(self, dataset: Mapping[str, Any]) -> StageSpec | None:
        """The ``prepare_data`` stage of a ``prepared`` data set (None for the others): one per data
        set and files, whatever the split, so every sweep on the same files shares it."""
        if not self.catalogue.datasets[dataset["name"]].prepared:
            return None
        settings = {"dataset": {"name": dataset["name"], "fingerprint": dataset["fingerprint"]}}
        return self._stage("data", "prepare_data", [dataset["name"]], settings=settings, upstream={},
                           runtime={"data_root": self.sweep.data_root})

    def _fingerprint(self, dataset_name: str) -> str:
        """The data set's fingerprint under the sweep's data_root, computed once per plan."""
        if dataset_name not in self.fingerprints:
            dataset = self.catalogue.datasets[dataset_name]
            self.fingerprints[dataset_name] = dataset_fingerprint(dataset, self.sweep.data_root)
        return self.fingerprints[dataset_name]

    def _dataset_facts(self, dataset_name: str) -> DatasetSpec:
        """The data set's declaration completed from its folder (``Catalogue.dataset``), read once per
        plan: an image folder's scan lists every file, and a cached sweep asks once per experiment."""
        if dataset_name not in self.dataset_facts:
            self.dataset_facts[dataset_name] = self.catalogue.dataset(dataset_name, self.sweep.data_root)
        return self.dataset_facts[dataset_name]

    def _runtime(self, section: Mapping[str, Any]) -> dict[str, Any]:
        return {"data_root": self.sweep.data_root, **{key: section[key] for key in RUNTIME_KEYS if key in section}}

    def _stage(
        self,
        group: str,
        kind: str,
        readable: list[str],
        settings: dict[str, Any],
        upstream: dict[str, StageSpec],
        runtime: dict[str, Any],
        hashed: dict[str, Any] | None = None,
        data: StageSpec | None = None,
    ) -> StageSpec:
        """The stage with these settings, made on first use; ``hashed`` defaults to ``settings``.

        ``data``, the ``prepare_data`` stage it reads its images from, joins its upstream as role
        ``data`` without entering its hash (the data set's fingerprint in ``settings`` stands for it).
        """
        digest = content_hash({
            "kind": kind,
            "settings": settings if hashed is None else hashed,
            "upstream": {role: stage.hash for role, stage in upstream.items()},
        })
        if data is not None:
            upstream = {**upstream, "data": data}
        known = self.groups[group].get(digest)
        if known is not None:
            return known
        stage = StageSpec(
            kind=kind,
            name="-".join([kind, *readable, digest[:8]]),
            hash=digest,
            settings=copy.deepcopy(settings),
            upstream={role: stage.name for role, stage in upstream.items()},
            runtime=dict(runtime),
            resources=copy.deepcopy(self.sweep.resources[kind]),
        )
        self.groups[group][digest] = stage
        return stage


def _listed(value: Any) -> list[Any]:
    """A tap param's taps: a list of them, or one."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _feature_values(teacher_arch: str, dataset: DatasetSpec, taps: list[str | int]) -> int:
    """Values per sample of the teacher's features at ``taps``: their shapes come from a forward
    pass on torch's meta device, so only a plan that caches features imports torch."""
    if not taps:
        return 0
    from models.registry import tap_shapes

    shapes = tap_shapes(teacher_arch, tuple(dataset.image_shape), dataset.num_classes)
    return sum(math.prod(shapes[tap]) for tap in taps)


def method_settings(value: str, parts: list[MethodSpec], params: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The student's method settings: ``{"name", "params"}`` for one method (as before compositions,
    so no existing hash moved); ``{"name", "parts"}`` for several, where the parts after the first
    leave out ``ce_weight``: the cross-entropy is counted once, with the first part's weight."""
    if len(parts) == 1:
        return {"name": value, "params": dict(params[value])}
    return {"name": value, "parts": [
        {"name": part.name, "params": {key: item for key, item in params[part.name].items() if index == 0 or key != "ce_weight"}}
        for index, part in enumerate(parts)
    ]}


def _hashed_training(section: Mapping[str, Any]) -> dict[str, Any]:
    """Training settings without the runtime keys, which say where a stage runs, not what it computes."""
    return {key: value for key, value in section.items() if key not in RUNTIME_KEYS}
