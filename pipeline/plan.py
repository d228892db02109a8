"""Sweep file -> stage graph: one experiment per combination of axis values, one stage per distinct hash.

A stage's hash covers exactly what its output depends on, plus its upstream stages' hashes:

* train_teacher: dataset (name, val_fraction, split_seed, fingerprint), teacher arch, teacher training settings;
* pretrain_paraphraser: teacher hash, method name and the params its pre-stage declares;
* train_student: dataset, student arch, student training settings (seed included), method name and
  all its params, and the teacher / paraphraser hashes only when the method reads them, so a
  vanilla student is shared by every pair with its architecture and never retrains for a teacher;
* evaluate: the evaluated model's hash and the reference teacher's.

Runtime settings (data_root, device, amp) and the evaluation batch size are not hashed: they change
where or how fast a stage runs, not what it computes. What the data files hold is hashed, as the
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
import os
from typing import Any, Iterator, Mapping

from pipeline.catalogue import Catalogue, MethodSpec, dataset_fingerprint, load_catalogue
from pipeline.graph import Experiment, Plan, StageSpec
from pipeline.hashing import content_hash
from pipeline.sweep import Sweep, load_sweep
from pipeline.sweep_schema import RUNTIME_KEYS, SECTIONS

__all__ = ["Experiment", "Plan", "StageSpec", "build_plan", "expand"]

_GROUPS = ("teacher", "teacher_evaluate", "paraphraser", "student", "evaluate")
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
        method = self.catalogue.methods[values["method"]]
        sections, params = self._resolve(values, method)
        dataset_name, seed = values["dataset"], values["seed"]
        teacher_arch, student_arch = values["pair"].split(":")
        dataset = {"name": dataset_name, **sections["data"], "fingerprint": self._fingerprint(dataset_name)}
        method_settings = {"name": method.name, "params": params}

        teacher = self._stage(
            "teacher", "train_teacher", [dataset_name, teacher_arch],
            settings={"dataset": dataset, "arch": teacher_arch, "training": _hashed_training(sections["teacher"])},
            upstream={},
            runtime=self._runtime(sections["teacher"]),
        )
        evaluation = {"dataset": dataset, "batch_size": sections["evaluate"]["batch_size"]}
        evaluation_runtime = {"data_root": self.sweep.data_root, "device": sections["evaluate"]["device"]}
        teacher_evaluate = self._stage(
            "teacher_evaluate", "evaluate", [dataset_name, teacher_arch, "teacher"],
            settings=evaluation, upstream={"model": teacher}, runtime=evaluation_runtime, hashed={},
        )
        paraphraser = None
        if method.pre_stage is not None:
            paraphraser = self._stage(
                "paraphraser", method.pre_stage.kind, [dataset_name, teacher_arch],
                # Only the params the pre-stage depends on: a shared paraphraser must not show the
                # first FT run's beta or student tap as if they had shaped it.
                settings={"dataset": dataset, "teacher_arch": teacher_arch, "method": {
                    "name": method.name, "params": {key: params[key] for key in method.pre_stage.params}}},
                upstream={"teacher": teacher},
                runtime=self._runtime(sections["student"]),
                hashed={"method": method.name, "params": {key: params[key] for key in method.pre_stage.params}},
            )
        student_upstream = {"teacher": teacher} if method.uses_teacher else {}
        if paraphraser is not None:
            student_upstream["paraphraser"] = paraphraser
        run = [dataset_name, student_arch, method.name, f"s{seed}"]
        student = self._stage(
            "student", "train_student", run,
            settings={
                "dataset": dataset,
                "arch": student_arch,
                "training": {**_hashed_training(sections["student"]), "seed": seed},
                "method": method_settings,
            },
            upstream=student_upstream,
            runtime=self._runtime(sections["student"]),
        )
        evaluate = self._stage(
            "evaluate", "evaluate", run,
            settings=evaluation, upstream={"model": student, "teacher": teacher}, runtime=evaluation_runtime, hashed={},
        )
        return Experiment(
            dataset=dataset_name,
            teacher=teacher_arch,
            student=student_arch,
            method=method.name,
            seed=seed,
            axis_values=dict(values),
            teacher_stage=teacher.name,
            teacher_evaluate_stage=teacher_evaluate.name,
            paraphraser_stage=None if paraphraser is None else paraphraser.name,
            student_stage=student.name,
            evaluate_stage=evaluate.name,
        )

    def _resolve(self, values: Mapping[str, Any], method: MethodSpec) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        """The sections and this method's params of one combination: defaults, then its dotted axis values."""
        sections = {section: dict(self.sweep.defaults[section]) for section in SECTIONS}
        params = dict(self.sweep.defaults["methods"][method.name])
        for key, value in values.items():
            head, _, rest = key.partition(".")
            if head in sections:
                sections[head][rest] = value
            elif head == "methods":
                owner, _, param = rest.partition(".")
                if owner == method.name:
                    params[param] = value
        return sections, {key: params[key] for key in method.params}

    def _fingerprint(self, dataset_name: str) -> str:
        """The data set's fingerprint under the sweep's data_root, computed once per plan."""
        if dataset_name not in self.fingerprints:
            dataset = self.catalogue.datasets[dataset_name]
            self.fingerprints[dataset_name] = dataset_fingerprint(dataset, self.sweep.data_root)
        return self.fingerprints[dataset_name]

    def _runtime(self, section: Mapping[str, Any]) -> dict[str, Any]:
        return {"data_root": self.sweep.data_root, **{key: section[key] for key in RUNTIME_KEYS}}

    def _stage(
        self,
        group: str,
        kind: str,
        readable: list[str],
        settings: dict[str, Any],
        upstream: dict[str, StageSpec],
        runtime: dict[str, Any],
        hashed: dict[str, Any] | None = None,
    ) -> StageSpec:
        """The stage with these settings, made on first use; ``hashed`` defaults to ``settings``."""
        digest = content_hash({
            "kind": kind,
            "settings": settings if hashed is None else hashed,
            "upstream": {role: stage.hash for role, stage in upstream.items()},
        })
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


def _hashed_training(section: Mapping[str, Any]) -> dict[str, Any]:
    """Training settings without the runtime keys, which say where a stage runs, not what it computes."""
    return {key: value for key, value in section.items() if key not in RUNTIME_KEYS}
