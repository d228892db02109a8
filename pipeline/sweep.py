"""Reading a sweep file and checking all of it before anything is planned or submitted.

A sweep that fails half way through a cluster run costs hours, so every key, type, range, name
and tap is checked here, against ``pipeline/sweep_schema.py`` and the catalogue read from the
method, model and data files. The first problem found (in a fixed order: name, data_root, axes,
defaults, the method checks that need both, resources) becomes one ``SweepError`` line naming the
file, the key path and, where there is a closed set, the allowed values.
"""
from __future__ import annotations

import itertools
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.catalogue import COMPOSITION_SEPARATOR, Catalogue, method_names
from pipeline.fields import Field, FieldError, check_tap, unknown_key
from pipeline.hashing import canonical_json
from pipeline.sweep_schema import (
    DEFAULTS_KEYS,
    MULTI_RANK_KINDS,
    NAMED_AXES,
    REQUIRED_AXES,
    RESOURCE_FIELDS,
    RESOURCE_SECTIONS,
    SECTIONS,
    SEED,
    STAGE_KINDS,
    TOP_LEVEL_KEYS,
    rank_count,
)

_SWEEP_NAME = re.compile(r"[A-Za-z0-9_-]+")
_STUDENT_SEED_HINT = "the student's seed is the 'seed' axis, not a student setting"


class SweepError(ValueError):
    """A sweep file that cannot be planned: ``<file>: <key path>: <problem>; allowed: <values>``."""

    def __init__(self, file: str, key: str, problem: str, allowed: Iterable[str] = ()):
        allowed = tuple(allowed)
        message = f"{file}: {key}: {problem}" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
        super().__init__(" ".join(message.split()))
        self.file = file
        self.key = key


@dataclass(frozen=True)
class Sweep:
    """A checked sweep with every default filled in.

    ``axes`` keeps the file's order (``seed`` is added last when absent); each value is a tuple of
    checked values. ``defaults`` holds the sections data, teacher, student, evaluate (complete) and
    ``methods``: method -> params with the catalogue's defaults under the sweep's values (a required
    param set only by an axis is absent here); ``compositions``: a composed method value (``crd+kd``)
    -> part -> the values the sweep gives that part in that composition only. ``resources`` maps each stage kind to its merged
    request. ``data_root`` is absolute, or None when neither the sweep nor KDBENCH_DATA sets it.
    """

    name: str
    path: str
    data_root: str | None
    axes: Mapping[str, tuple[Any, ...]]
    defaults: Mapping[str, Mapping[str, Any]]
    resources: Mapping[str, Mapping[str, Any]]


def load_sweep(path: str | os.PathLike, catalogue: Catalogue) -> Sweep:
    """Reads and checks the sweep file at ``path``; raises SweepError on the first problem."""
    file = str(path)
    try:
        text = Path(file).read_text()
    except OSError as error:
        raise SweepError(file, "(file)", f"cannot read it: {error.strerror}") from None
    try:
        document = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark else "(file)"
        raise SweepError(file, where, f"YAML syntax error: {error.problem or error.context}") from None
    except yaml.YAMLError as error:
        raise SweepError(file, "(file)", f"YAML error: {error}") from None
    return check_sweep(document, file, catalogue)


def check_sweep(document: Any, file: str, catalogue: Catalogue) -> Sweep:
    """Checks an already parsed sweep document; ``file`` is only used to name it in errors."""
    return _SweepChecker(file, catalogue).check(document)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping instead of keeping the last one, and
    reads numbers as YAML 1.2 does: PyYAML follows YAML 1.1, where ``5e-4``, ``1e-3`` and ``.5`` are
    strings (its float needs a dot and a signed exponent), while papers and every peer's configs
    write learning rates and weight decays that way."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: list[Any] = []
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.append(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 core schema floats. Resolvers are tried in the order they were added, so SafeLoader's
# int resolver still claims plain integers ("240" stays an int); this one only adds what 1.1 missed.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$"),
    list("-+.0123456789"),
)


class _SweepChecker:
    """Checks one document; holds the file name and catalogue so each check reads as one line."""

    def __init__(self, file: str, catalogue: Catalogue):
        self.file = file
        self.catalogue = catalogue

    def check(self, document: Any) -> Sweep:
        top = self._mapping("(top level)", document, required=True)
        self._known_keys("", top, TOP_LEVEL_KEYS)
        name = top.get("name")
        if name is None:
            raise self._error("name", "missing; every sweep has a name ([A-Za-z0-9_-]+)")
        if not isinstance(name, str) or not _SWEEP_NAME.fullmatch(name):
            raise self._error("name", f"{name!r} must match [A-Za-z0-9_-]+")
        data_root = self._data_root(top.get("data_root"))
        axes = self._axes(top.get("axes"))
        defaults = self._defaults(top.get("defaults"))
        self._check_used_methods(axes, defaults)
        self._check_milestones(axes, defaults)
        self._check_optimisers(axes, defaults)
        self._check_subsets(axes, defaults, data_root)
        self._check_image_sizes(axes)
        self._check_zero_epochs(axes, defaults)
        self._check_cached_methods(axes, defaults)
        self._check_analysis(axes, defaults, data_root)
        resources = self._resources(top.get("resources"))
        self._check_student_ranks(axes, resources)
        return Sweep(name, self.file, data_root, axes, defaults, resources)

    def _error(self, key: str, problem: str, allowed: Iterable[Any] = ()) -> SweepError:
        return SweepError(self.file, key, problem, (str(value) for value in allowed))

    def _value(self, key: str, field: Field, value: Any) -> Any:
        try:
            return field.check(value)
        except FieldError as error:
            raise self._error(key, error.problem, error.allowed) from None

    def _mapping(self, key: str, value: Any, required: bool = False) -> dict:
        if value is None and not required:
            return {}
        if not isinstance(value, dict):
            raise self._error(key, f"must be a mapping, got {type(value).__name__}")
        return value

    def _known_keys(self, prefix: str, mapping: dict, allowed: Iterable[str], what: str = "key") -> None:
        allowed = list(allowed)
        for key in mapping:
            if key not in allowed:
                path = f"{prefix}.{key}" if prefix else str(key)
                if path == "defaults.student.seed":
                    raise self._error(path, _STUDENT_SEED_HINT)
                error = unknown_key(key, allowed, what)
                raise self._error(path, error.problem, error.allowed)

    def _data_root(self, value: Any) -> str | None:
        """The sweep's data_root (relative to the sweep file), else KDBENCH_DATA (relative to the working folder)."""
        if value is None:
            from_environment = os.environ.get("KDBENCH_DATA")
            return os.path.abspath(os.path.expanduser(from_environment)) if from_environment else None
        if not isinstance(value, str) or not value:
            raise self._error("data_root", f"must be a folder path or null, got {value!r}")
        return os.path.abspath(os.path.join(os.path.dirname(self.file), os.path.expanduser(value)))

    def _axes(self, value: Any) -> dict[str, tuple[Any, ...]]:
        raw = self._mapping("axes", value, required=True)
        for key in REQUIRED_AXES:
            if key not in raw:
                raise self._error(f"axes.{key}", "missing; every sweep sets this axis")
        axes = {}
        for key, values in raw.items():
            check = self._axis_check(str(key))
            if not isinstance(values, list) or not values:
                raise self._error(f"axes.{key}", f"must be a non-empty list, got {values!r}")
            checked = tuple(check(f"axes.{key}[{index}]", item) for index, item in enumerate(values))
            seen = set()
            for index, item in enumerate(checked):
                if canonical_json(item) in seen:
                    raise self._error(f"axes.{key}[{index}]", f"{values[index]!r} is listed twice")
                seen.add(canonical_json(item))
            axes[str(key)] = checked
        axes.setdefault("seed", (SEED.default,))
        return axes

    def _axis_check(self, key: str) -> Callable[[str, Any], Any]:
        """The function that checks one value of axis ``key``; an unknown key is an error."""
        named = {"dataset": self._dataset, "pair": self._pair, "method": self._method_name}
        if key in named:
            return named[key]
        field = self._dotted_fields().get(key, SEED if key == "seed" else None)
        if field is None:
            if key == "student.seed":
                raise self._error(f"axes.{key}", _STUDENT_SEED_HINT)
            error = unknown_key(key, [*NAMED_AXES, *self._dotted_fields()], "axis")
            raise self._error(f"axes.{key}", error.problem, error.allowed)
        return lambda where, item: self._value(where, field, item)

    def _dotted_fields(self) -> dict[str, Field]:
        fields = {f"{section}.{key}": field for section, keys in SECTIONS.items() for key, field in keys.items()}
        for method in self.catalogue.methods.values():
            fields.update({f"methods.{method.name}.{key}": field for key, field in method.params.items()})
        return fields

    def _dataset(self, where: str, value: Any) -> str:
        return self._catalogue_name(where, value, self.catalogue.datasets, "dataset")

    def _method_name(self, where: str, value: Any) -> str:
        """One method, or several joined by '+' (``crd+kd``): each known, none twice, at most one with a pre-stage."""
        if not isinstance(value, str):
            return self._catalogue_name(where, value, self.catalogue.methods, "method")
        names = method_names(value)
        for name in names:
            self._catalogue_name(where, name, self.catalogue.methods, "method")
        for index, name in enumerate(names):
            if name in names[:index]:
                raise self._error(where, f"{value!r} names method {name} twice; each part of a composition is a different method")
        # A pre-stage needed only for some param values (``when``) is checked per experiment by the plan.
        with_pre_stage = [name for name in names
                          if self.catalogue.methods[name].pre_stage is not None and not self.catalogue.methods[name].pre_stage.when]
        if len(with_pre_stage) > 1:
            kinds = ", ".join(f"{name} ({self.catalogue.methods[name].pre_stage.kind})" for name in with_pre_stage)
            raise self._error(where, f"{value!r} combines methods that each need a pre-stage: {kinds}; "
                                     "a student has one pre-stage, so combine at most one of them")
        return value

    def _pair(self, where: str, value: Any) -> str:
        if not isinstance(value, str) or value.count(":") != 1:
            raise self._error(where, f"{value!r} must be 'teacher:student', e.g. 'resnet32x4:resnet8x4'")
        teacher, student = value.split(":")
        self._catalogue_name(where, teacher, self.catalogue.architectures, "teacher architecture")
        self._catalogue_name(where, student, self.catalogue.architectures, "student architecture")
        return value

    def _catalogue_name(self, where: str, value: Any, known: Mapping[str, Any], what: str) -> str:
        if not isinstance(value, str) or value not in known:
            error = unknown_key(value, sorted(known), what)
            raise self._error(where, error.problem, error.allowed)
        return value

    def _defaults(self, value: Any) -> dict[str, dict[str, Any]]:
        raw = self._mapping("defaults", value)
        self._known_keys("defaults", raw, DEFAULTS_KEYS)
        defaults = {
            section: self._settings(f"defaults.{section}", raw.get(section), fields)
            for section, fields in SECTIONS.items()
        }
        methods = self._mapping("defaults.methods", raw.get("methods"))
        compositions = {key: item for key, item in methods.items() if COMPOSITION_SEPARATOR in str(key)}
        singles = {key: item for key, item in methods.items() if key not in compositions}
        self._known_keys("defaults.methods", singles, sorted(self.catalogue.methods), "method")
        defaults["methods"] = {
            name: self._settings(f"defaults.methods.{name}", singles.get(name), method.params, f"{name} param")
            for name, method in self.catalogue.methods.items()
        }
        defaults["compositions"] = {
            value: self._composition_settings(f"defaults.methods.{value}", value, parts)
            for value, parts in compositions.items()
        }
        return defaults

    def _composition_settings(self, where: str, value: str, given: Any) -> dict[str, dict[str, Any]]:
        """A composition's own values for its parts (``crd+kd: {kd: {kd_weight: 1.0}}``), over the parts'
        ``defaults.methods``: only the keys given, each checked against its part's declaration."""
        names = method_names(self._method_name(where, value))
        parts = self._mapping(where, given)
        self._known_keys(where, parts, names, f"part of {value}")
        overrides = {}
        for name, settings in parts.items():
            fields = self.catalogue.methods[name].params
            settings = self._mapping(f"{where}.{name}", settings)
            self._known_keys(f"{where}.{name}", settings, fields, f"{name} param")
            overrides[name] = {key: self._value(f"{where}.{name}.{key}", fields[key], item) for key, item in settings.items()}
        return overrides

    def _settings(self, where: str, value: Any, fields: Mapping[str, Field], what: str = "key") -> dict[str, Any]:
        """The checked values given under ``where``, over the fields' defaults (required ones stay unset)."""
        given = self._mapping(where, value)
        self._known_keys(where, given, fields, what)
        checked = {key: self._value(f"{where}.{key}", fields[key], item) for key, item in given.items()}
        return {key: checked.get(key, field.default) for key, field in fields.items() if key in checked or not field.required}

    def _check_used_methods(self, axes: Mapping[str, tuple], defaults: Mapping[str, Mapping[str, Any]]) -> None:
        """Required params are set, and tap params name taps of every pair's models, for each method run."""
        pairs = [pair.split(":") for pair in axes["pair"]]
        for name in dict.fromkeys(part for value in axes["method"] for part in method_names(value)):
            for key, field in self.catalogue.methods[name].params.items():
                axis = f"methods.{name}.{key}"
                if axis in axes:
                    values = [(f"axes.{axis}[{index}]", item) for index, item in enumerate(axes[axis])]
                elif key in defaults["methods"][name]:
                    values = [(f"defaults.{axis}", defaults["methods"][name][key])]
                else:
                    raise self._error(f"defaults.{axis}", f"required by method {name} and not set; set it here or as axis {axis}")
                if field.tap is None:
                    continue
                values += [
                    (f"defaults.methods.{value}.{name}.{key}", overrides[name][key])
                    for value, overrides in defaults["compositions"].items() if key in overrides.get(name, {})
                ]
                for where, item in values:
                    for teacher, student in pairs:
                        arch = teacher if field.tap == "teacher" else student
                        self._tap(where, field, item, arch)

    def _check_milestones(self, axes: Mapping[str, tuple], defaults: Mapping[str, Mapping[str, Any]]) -> None:
        """Explicit step milestones increase and lie in 1..epochs, for every epochs they are planned with."""
        for section in ("teacher", "student"):
            all_epochs = [epochs for _, epochs in _section_values(axes, defaults, section, "epochs")]
            for where, milestones in _section_values(axes, defaults, section, "milestones"):
                if milestones is None:
                    continue
                for epochs in all_epochs:
                    allowed = [f"increasing epochs in 1..{epochs} ({section}.epochs)", "null (the recipe's, scaled)"]
                    for index, milestone in enumerate(milestones):
                        if index and milestone <= milestones[index - 1]:
                            problem = f"{milestone} does not increase on {milestones[index - 1]}"
                            raise self._error(f"{where}[{index}]", problem, allowed)
                        if milestone > epochs:
                            raise self._error(f"{where}[{index}]", f"{milestone} is beyond the {epochs} epochs", allowed)

    def _check_optimisers(self, axes: Mapping[str, tuple], defaults: Mapping[str, Mapping[str, Any]]) -> None:
        """Optimiser and schedule keys that torch would refuse, or that do nothing, for every combination planned.

        Lion with an lr above 1e-2 plans but warns once per key on stderr: its sign update is larger
        than AdamW's, so its lr is usually 3-10x smaller (lion-pytorch's README).
        """
        keys = ("optimizer", "momentum", "nesterov", "betas", "epochs", "warmup_epochs", "pct_start", "lr")
        warned = set()
        for section in ("teacher", "student"):
            for combination in _section_combinations(axes, defaults, section, keys):
                (optimizer_at, optimizer), (where, nesterov) = combination["optimizer"], combination["nesterov"]
                if nesterov and optimizer != "sgd":
                    problem = f"nesterov is for optimizer sgd, not {optimizer} ({optimizer_at})"
                    raise self._error(where, problem, ["false", "true with sgd"])
                momentum_at, momentum = combination["momentum"]
                if nesterov and momentum == 0:
                    problem = f"nesterov needs momentum above 0 ({momentum_at} is 0)"
                    raise self._error(where, problem, ["false", "true with momentum > 0"])
                where, betas = combination["betas"]
                if betas is not None and optimizer == "sgd":
                    raise self._error(where, f"betas are for adamw and lion, not sgd ({optimizer_at})", ["null"])
                for index, beta in enumerate(betas or []):
                    if beta >= 1:
                        raise self._error(f"{where}[{index}]", f"{beta!r} is not below 1", ["two numbers in [0, 1)", "null"])
                (where, warmup), (epochs_at, epochs) = combination["warmup_epochs"], combination["epochs"]
                if warmup > epochs:
                    raise self._error(where, f"{warmup} is beyond the {epochs} epochs ({epochs_at})", [f"0..{epochs}"])
                where, pct_start = combination["pct_start"]
                if not 0 < pct_start < 1:
                    raise self._error(where, f"{pct_start!r} is not strictly between 0 and 1", ["numbers in (0, 1)"])
                where, lr = combination["lr"]
                if optimizer == "lion" and lr > 1e-2 and where not in warned:
                    warned.add(where)
                    print(f"{self.file}: {where}: warning: lr {lr!r} is high for optimizer lion, "
                          "which wants a 3-10x smaller lr than adamw", file=sys.stderr)

    def _check_subsets(self, axes: Mapping[str, tuple], defaults: Mapping[str, Mapping[str, Any]], data_root: str | None) -> None:
        """A data.subset_size fits every data set's training split at every val_fraction it is planned with."""
        for where, subset_size in _section_values(axes, defaults, "data", "subset_size"):
            if subset_size is None:
                continue
            for dataset in axes["dataset"]:
                for fraction_at, val_fraction in _section_values(axes, defaults, "data", "val_fraction"):
                    size = self.catalogue.dataset(dataset, data_root).training_split_size(val_fraction)
                    if subset_size > size:
                        problem = (f"{subset_size} is more than the {size} images of {dataset}'s training split "
                                   f"(after the validation hold-out of {fraction_at})")
                        raise self._error(where, problem, [f"1..{size}", "null (the whole split)"])

    def _check_cached_methods(self, axes: Mapping[str, tuple], defaults: Mapping[str, Mapping[str, Any]]) -> None:
        """teacher_cache.methods names methods of the method axis."""
        for where, methods in _section_values(axes, defaults, "teacher_cache", "methods"):
            for index, method in enumerate(methods or []):
                if method not in axes["method"]:
                    raise self._error(f"{where}[{index}]", f"{method!r} is not on the method axis", axes["method"])

    def _check_analysis(self, axes: Mapping[str, tuple], defaults: Mapping[str, Mapping[str, Any]], data_root: str | None) -> None:
        """analysis.taps name taps of every analysed model, and the sample holds at least two images of
        every class (a within-class cosine needs a pair), for every value planned."""
        pairs = [dict(zip(("teacher", "student"), pair.split(":"))) for pair in axes["pair"]]
        keys = ("taps", "models", "samples", "stats", "geometry", "splits")
        for combination in _section_combinations(axes, defaults, "analysis", keys):
            if not (combination["stats"][1] or combination["geometry"][1]):
                continue
            where, splits = combination["splits"]
            if not splits:
                raise self._error(where, "an empty list analyses nothing", ["train", "test", "[train, test]"])
            where, taps = combination["taps"]
            if taps is not None and not taps:
                raise self._error(where, "an empty list analyses nothing", ["tap names or generalised-layer indices",
                                                                            "null (every generalised layer)"])
            for role in combination["models"][1]:
                for pair in pairs:
                    self._tap(where, Field("list", tap=role), taps, pair[role])
            where, samples = combination["samples"]
            for dataset in axes["dataset"]:
                classes = self.catalogue.dataset(dataset, data_root).num_classes
                if classes and samples < 2 * classes:
                    raise self._error(where, f"{samples} images give fewer than two per class of {dataset}'s {classes}",
                                      [f"an int >= {2 * classes}"])

    def _check_zero_epochs(self, axes: Mapping[str, tuple], defaults: Mapping[str, Mapping[str, Any]]) -> None:
        """epochs 0 (use imported weights as they are) only for a teacher that imports weights."""
        for where, epochs in _section_values(axes, defaults, "student", "epochs"):
            if epochs == 0:
                raise self._error(where, "a student trains at least one epoch (0 is for a teacher whose init imports weights)",
                                  ["an int >= 1"])
        for combination in _section_combinations(axes, defaults, "teacher", ("epochs", "init")):
            (where, epochs), (init_at, init) = combination["epochs"], combination["init"]
            if epochs == 0 and init == "scratch":
                raise self._error(where, f"epochs 0 uses the imported weights as they are, but {init_at} is scratch; "
                                         "import weights (init: {torchvision: NAME} or {checkpoint: PATH}) or train",
                                  ["an int >= 1", "0 with an init other than scratch"])

    def _check_image_sizes(self, axes: Mapping[str, tuple]) -> None:
        """Every architecture of every pair accepts every data set's images (no ViT-B/16 on 8x8 digits)."""
        for index, pair in enumerate(axes["pair"]):
            for role, arch in zip(("teacher", "student"), pair.split(":")):
                needed = self.catalogue.architectures[arch].min_image_size
                for dataset in axes["dataset"]:
                    side = min(self.catalogue.datasets[dataset].image_shape[1:])
                    if side < needed:
                        fits = sorted(name for name, spec in self.catalogue.architectures.items() if spec.min_image_size <= side)
                        raise self._error(
                            f"axes.pair[{index}]",
                            f"{role} {arch} needs images of at least {needed}x{needed} px, but data set {dataset} "
                            f"has {side}x{side}; architectures that fit it", fits)

    def _tap(self, where: str, field: Field, value: Any, arch: str) -> None:
        if value is None:
            return
        try:
            architecture = self.catalogue.architectures[arch]
            check_tap(field, value, architecture.taps, architecture.layers, arch)
        except FieldError as error:
            raise self._error(where, error.problem, error.allowed) from None

    def _check_student_ranks(self, axes: Mapping[str, tuple], resources: Mapping[str, Mapping[str, Any]]) -> None:
        """Students on several ranks only for methods whose every part has a per-sample loss
        (METHOD ``per_sample_loss``): a batch-relational loss on a rank's share is not the batch's."""
        ranks = rank_count(resources["train_student"])
        if ranks == 1:
            return
        able = sorted(name for name, method in self.catalogue.methods.items() if method.per_sample_loss)
        for method in axes["method"]:
            unable = [name for name in method_names(method) if not self.catalogue.methods[name].per_sample_loss]
            if unable:
                raise self._error("resources.train_student", f"asks for {ranks} ranks, but method {method!r} computes its "
                                  f"loss across the batch ({', '.join(unable)}), which a rank's share does not give; "
                                  "train its students on one rank (tasks: 1, gpus: 1) or drop it", able)

    def _resources(self, value: Any) -> dict[str, dict[str, Any]]:
        raw = self._mapping("resources", value)
        self._known_keys("resources", raw, RESOURCE_SECTIONS, "stage kind")
        given = {}
        for kind, request in raw.items():
            where = f"resources.{kind}"
            request = self._mapping(where, request)
            self._known_keys(where, request, RESOURCE_FIELDS)
            given[kind] = {key: self._value(f"{where}.{key}", RESOURCE_FIELDS[key], item) for key, item in request.items()}
        built_in = {key: field.default for key, field in RESOURCE_FIELDS.items() if field.default is not None}
        merged = {kind: {**built_in, **given.get("default", {}), **given.get(kind, {})} for kind in STAGE_KINDS}
        resources = {kind: {key: item for key, item in request.items() if item is not None} for kind, request in merged.items()}
        for kind, request in resources.items():
            if kind not in MULTI_RANK_KINDS and rank_count(request) > 1:
                where = f"resources.{kind}" if kind in given else "resources.default"
                raise self._error(where, f"asks for {rank_count(request)} ranks (nodes x tasks, tasks defaulting to gpus); "
                                  f"several ranks per stage run only {', '.join(MULTI_RANK_KINDS)} for now: set "
                                  f"tasks: 1 (and gpus: 1) for {kind}", MULTI_RANK_KINDS)
        return resources


def _section_values(
    axes: Mapping[str, tuple], defaults: Mapping[str, Mapping[str, Any]], section: str, key: str
) -> list[tuple[str, Any]]:
    """(where, value) for ``section.key``: each value of its axis, or else the one value under defaults."""
    axis = f"{section}.{key}"
    if axis in axes:
        return [(f"axes.{axis}[{index}]", value) for index, value in enumerate(axes[axis])]
    return [(f"defaults.{axis}", defaults[section][key])]


def _section_combinations(
    axes: Mapping[str, tuple], defaults: Mapping[str, Mapping[str, Any]], section: str, keys: Iterable[str]
) -> list[dict[str, tuple[str, Any]]]:
    """Every combination of the (where, value) pairs of ``section``'s ``keys``, as the axes' product plans them."""
    keys = list(keys)
    choices = [_section_values(axes, defaults, section, key) for key in keys]
    return [dict(zip(keys, combination)) for combination in itertools.product(*choices)]
