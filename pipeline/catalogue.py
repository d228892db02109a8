"""What methods, architectures and data sets exist, read from their source files without importing them.

Each ``distill/*.py`` declares ``METHOD``, each ``models/*.py`` may declare ``ARCHITECTURES`` and
each ``data/*.py`` may declare ``DATASETS``, all as top-level dict literals. Reading them with
``ast.literal_eval`` lets the planner validate a sweep in milliseconds and without torch, while the
runtime registries read the very same literals: one source of truth, and no config can run code.
A data set's fingerprint comes from ``data/files.py``, the one torch-free module of data/ that the
planner imports: it finds the files with the same code the readers use.
"""
from __future__ import annotations

import ast
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from dataclasses import field as dataclass_field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from data.files import FINGERPRINTS, NO_DATA_ROOT, fingerprint
from data.layouts import folder_facts
from pipeline.fields import TYPES, Field, FieldError

REPO_ROOT = Path(__file__).resolve().parent.parent
PRE_STAGE_KINDS = ("pretrain_paraphraser", "fit_pca")
LAYER_INDEX_PATH = Path("models", "layer_index.json")
_NAME = re.compile(r"[A-Za-z0-9_.]+")
"""Names become parts of stage folder names, where '-' separates the parts and ':' splits a pair."""
_PARAM_KEYS = ("default", "min", "max", "choices", "tap", "length", "type", "required", "help")
_METHOD_KEYS = ("name", "summary", "uses_teacher", "params", "pre_stage", "teacher_outputs_only", "per_sample_loss")
_TAP_OWNERS = ("teacher", "student")


class CatalogueError(ValueError):
    """A declaration in distill/, models/ or data/ that the planner cannot use; names file and key."""


@dataclass(frozen=True)
class PreStage:
    """A stage a method needs before its student trains (FT's paraphraser), the params it reads, and
    the param values it is needed for (``when``; empty: always), as a PCA projection needs its fit."""

    kind: str
    params: tuple[str, ...]
    when: Mapping[str, Any] = dataclass_field(default_factory=dict)

    def needed(self, params: Mapping[str, Any]) -> bool:
        """Whether a student with these method params needs this pre-stage."""
        return all(params.get(key) == value for key, value in self.when.items())


@dataclass(frozen=True)
class MethodSpec:
    """``teacher_outputs_only``: the loss reads nothing of the teacher but its logits and the
    features at its teacher-tap params (``teacher_taps``), of the loader's own batch (no re-mixed
    images, no teacher module), so a ``teacher_outputs`` stage can stand in for the teacher: with
    no taps always (``logits_only``), with taps when the sweep caches features too.

    ``per_sample_loss``: every loss term is a mean over the batch's samples of values each computed
    from one sample alone (its connectors' BatchNorm aside, which ranks synchronise), with no state
    kept across steps; so ranks that each take a share of the batch, weighting their terms by the
    share, add up to one process's loss, and a student of the method may train on several ranks.
    Batch-relational terms (RKD's distances, SP's and CC's similarity matrices, DIST's per-class
    correlations, CKD's groups), CRD's memory banks and mixup's in-batch pairs are not."""

    name: str
    summary: str
    uses_teacher: bool
    params: Mapping[str, Field]
    pre_stage: PreStage | None
    teacher_outputs_only: bool = False
    per_sample_loss: bool = False

    @property
    def teacher_tap_params(self) -> tuple[str, ...]:
        """The params that name teacher taps (a tap, or a list of them)."""
        return tuple(key for key, field in self.params.items() if field.tap == "teacher")

    @property
    def logits_only(self) -> bool:
        """Reads the teacher's logits of the loader's batch and nothing else of it."""
        return self.teacher_outputs_only and not self.teacher_tap_params


COMPOSITION_SEPARATOR = "+"
"""Joins methods trained together in one ``method`` value: ``crd+kd``."""


def method_names(value: str) -> list[str]:
    """The names of the methods a ``method`` value combines, in order: ``"crd+kd"`` -> crd, kd."""
    return value.split(COMPOSITION_SEPARATOR)


@dataclass(frozen=True)
class Architecture:
    """An ``ARCHITECTURES`` entry. ``layers`` are its generalised layers: the module names, in forward
    order, that a tap may also give by index (from ``LAYER_INDEX_PATH``). ``min_image_size``: the
    smallest input side in pixels it accepts (a ViT-B/16 needs whole 16 px patches)."""

    name: str
    taps: tuple[str, ...]
    layers: tuple[str, ...]
    min_image_size: int


@dataclass(frozen=True)
class DatasetSpec:
    """``train_images``: the size of the official training part, before the validation hold-out.
    ``prepared``: its images are decoded once, by a ``prepare_data`` stage that every stage reading
    the data set shares, instead of by each stage (folders of JPEGs; CIFAR's and the digits' files
    already hold the pixel arrays)."""

    name: str
    num_classes: int
    image_shape: tuple[int, ...]
    needs_root: bool
    summary: str
    train_images: int
    prepared: bool = False

    def training_split_size(self, val_fraction: float, subset_size: int | None = None) -> int:
        """Images a student trains on: the training part less the hold-out (rounded as
        ``data/splits.py`` rounds it), or the subset."""
        return subset_size if subset_size is not None else self.train_images - round(val_fraction * self.train_images)


@dataclass(frozen=True)
class Catalogue:
    methods: Mapping[str, MethodSpec]
    architectures: Mapping[str, Architecture]
    datasets: Mapping[str, DatasetSpec]

    def dataset(self, name: str, root: str | None) -> DatasetSpec:
        """Data set ``name`` with the facts its declaration leaves to its folder (``num_classes`` and
        ``train_images`` 0: a generic ``imagefolder``) read from the folder under ``root``."""
        spec = self.datasets[name]
        if (spec.num_classes and spec.train_images) or root is None:
            return spec
        num_classes, train_images = folder_facts(name, root)
        return replace(spec, num_classes=num_classes, train_images=train_images)


def load_catalogue(repo_root: Path | str | None = None) -> Catalogue:
    """The catalogue of the repository at ``repo_root`` (default: the one holding this package)."""
    root = Path(repo_root) if repo_root is not None else REPO_ROOT
    methods = {}
    for path, literal in _literals(root / "distill", "METHOD"):
        method = _method(path, literal)
        methods[method.name] = method
    layers = _layer_index(root)
    architectures = {
        name: _architecture(path, name, entry, layers)
        for path, name, entry in _entries(root / "models", "ARCHITECTURES")
    }
    datasets = {name: _dataset(path, name, entry) for path, name, entry in _entries(root / "data", "DATASETS")}
    return Catalogue(MappingProxyType(methods), MappingProxyType(architectures), MappingProxyType(datasets))


def _literals(folder: Path, variable: str) -> list[tuple[Path, Any]]:
    """(file, value) for every ``*.py`` in ``folder`` that assigns ``variable`` at top level."""
    found = []
    for path in sorted(folder.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(), filename=str(path))
        except SyntaxError as error:
            raise CatalogueError(f"{path}: line {error.lineno}: syntax error: {error.msg}") from None
        for node in tree.body:
            if _assigns(node, variable):
                try:
                    found.append((path, ast.literal_eval(node.value)))
                except ValueError:
                    raise CatalogueError(f"{path}: {variable}: must be a plain literal (no names or calls)") from None
    return found


def _assigns(node: ast.stmt, variable: str) -> bool:
    if isinstance(node, ast.Assign):
        return any(isinstance(target, ast.Name) and target.id == variable for target in node.targets)
    return isinstance(node, ast.AnnAssign) and node.value is not None and getattr(node.target, "id", None) == variable


def _entries(folder: Path, variable: str) -> list[tuple[Path, str, Any]]:
    """(file, name, entry) for each entry of every ``variable`` dict; a name declared twice is an error."""
    entries: list[tuple[Path, str, Any]] = []
    seen: dict[str, Path] = {}
    for path, literal in _literals(folder, variable):
        _expect(isinstance(literal, dict), path, variable, "must be a dict of name -> declaration")
        for name, entry in literal.items():
            where = f"{variable}[{name!r}]"
            _expect(isinstance(name, str) and bool(_NAME.fullmatch(name)), path, where, "name must match [A-Za-z0-9_.]+")
            _expect(name not in seen, path, where, f"also declared in {seen.get(name)}")
            _expect(isinstance(entry, dict), path, where, "must be a dict")
            seen[name] = path
            entries.append((path, name, entry))
    return entries


def _method(path: Path, literal: Any) -> MethodSpec:
    _expect(isinstance(literal, dict), path, "METHOD", "must be a dict")
    for key in literal:
        _expect(key in _METHOD_KEYS, path, f"METHOD.{key}", f"unknown key; allowed: {', '.join(_METHOD_KEYS)}")
    name = literal.get("name")
    _expect(name == path.stem, path, "METHOD.name", f"must equal the file name {path.stem!r}")
    _expect(isinstance(literal.get("uses_teacher"), bool), path, "METHOD.uses_teacher", "must be true or false")
    summary = literal.get("summary", "")
    _expect(isinstance(summary, str), path, "METHOD.summary", "must be a string")
    raw_params = literal.get("params", {})
    _expect(isinstance(raw_params, dict), path, "METHOD.params", "must be a dict of name -> declaration")
    for key in raw_params:
        _expect(isinstance(key, str) and key.isidentifier(), path, f"METHOD.params.{key}", "must be a Python identifier")
    params = {key: _param(path, f"METHOD.params.{key}", spec) for key, spec in raw_params.items()}
    outputs_only = literal.get("teacher_outputs_only", False)
    _expect(isinstance(outputs_only, bool), path, "METHOD.teacher_outputs_only", "must be true or false")
    _expect(not outputs_only or literal["uses_teacher"], path, "METHOD.teacher_outputs_only",
            "only a method that uses the teacher reads its outputs")
    per_sample = literal.get("per_sample_loss", False)
    _expect(isinstance(per_sample, bool), path, "METHOD.per_sample_loss", "must be true or false")
    return MethodSpec(name, summary, literal["uses_teacher"], MappingProxyType(params), _pre_stage(path, literal, params),
                      outputs_only, per_sample)


def _param(path: Path, where: str, spec: Any) -> Field:
    _expect(isinstance(spec, dict), path, where, "must be a dict")
    for key in spec:
        _expect(key in _PARAM_KEYS, path, f"{where}.{key}", f"unknown key; allowed: {', '.join(_PARAM_KEYS)}")
    required = spec.get("required", False)
    _expect(isinstance(required, bool), path, f"{where}.required", "must be true or false")
    _expect("default" in spec or required, path, where, "needs a default or required: true")
    _expect(not (required and "default" in spec), path, where, "a required param takes no default")
    default = spec.get("default")
    type_name = spec.get("type", None if default is None else type(default).__name__)
    _expect(type_name in TYPES, path, f"{where}.type", f"must be one of {', '.join(TYPES)} (needed when the default is missing or null)")
    _expect(spec.get("tap") in (None, *_TAP_OWNERS), path, f"{where}.tap", "must be 'teacher' or 'student'")
    for limit in ("min", "max"):
        _expect(isinstance(spec.get(limit, 0), (int, float)), path, f"{where}.{limit}", "must be a number")
    _expect(isinstance(spec.get("length", 0), int), path, f"{where}.length", "must be an int")
    choices = spec.get("choices")
    _expect(choices is None or isinstance(choices, (list, tuple)), path, f"{where}.choices", "must be a list")
    field = Field(
        type=type_name,
        default=default,
        required=required,
        min=spec.get("min"),
        max=spec.get("max"),
        choices=None if choices is None else tuple(choices),
        tap=spec.get("tap"),
        length=spec.get("length"),
        item_type=_item_type(default),
        help=spec.get("help", ""),
    )
    if "default" in spec:
        try:
            return replace(field, default=field.check(field.default))
        except FieldError as error:
            raise CatalogueError(f"{path}: {where}.default: {error.problem}") from None
    return field


def _pre_stage(path: Path, literal: dict, params: Mapping[str, Field]) -> PreStage | None:
    raw = literal.get("pre_stage")
    if raw is None:
        return None
    _expect(isinstance(raw, dict) and raw.get("kind") in PRE_STAGE_KINDS, path, "METHOD.pre_stage.kind",
            f"allowed: {', '.join(PRE_STAGE_KINDS)}")
    names = raw.get("params", [])
    _expect(isinstance(names, list), path, "METHOD.pre_stage.params", "must be a list of param names")
    for name in names:
        _expect(name in params, path, "METHOD.pre_stage.params", f"{name!r} is not one of METHOD.params")
    _expect(literal["uses_teacher"], path, "METHOD.pre_stage", "a pre-stage reads the teacher, so uses_teacher must be true")
    when = raw.get("when", {})
    _expect(isinstance(when, dict), path, "METHOD.pre_stage.when", "must be a dict of param name -> value")
    for name, value in when.items():
        _expect(name in params, path, f"METHOD.pre_stage.when.{name}", "is not one of METHOD.params")
        try:
            params[name].check(value)
        except FieldError as error:
            raise CatalogueError(f"{path}: METHOD.pre_stage.when.{name}: {error.problem}") from None
    for key in raw:
        _expect(key in ("kind", "params", "when"), path, f"METHOD.pre_stage.{key}", "unknown key; allowed: kind, params, when")
    return PreStage(raw["kind"], tuple(names), MappingProxyType(dict(when)))


def _architecture(path: Path, name: str, entry: dict, layers: Mapping[str, Any]) -> Architecture:
    where = f"ARCHITECTURES[{name!r}]"
    _expect(_is_list_of(entry.get("taps"), str), path, f"{where}.taps", "must be a list of tap names")
    size = entry.get("min_image_size")
    _expect(isinstance(size, int) and size >= 1, path, f"{where}.min_image_size",
            "must be the smallest input side in pixels the network accepts")
    _expect(name in layers and _is_list_of(layers[name], str), path, where,
            f"has no entry in {LAYER_INDEX_PATH}; rewrite it with: python -m models.registry")
    missing = [tap for tap in entry["taps"] if tap not in layers[name]]
    _expect(not missing, path, f"{where}.taps", f"{missing} are not generalised layers in {LAYER_INDEX_PATH}")
    return Architecture(name, tuple(entry["taps"]), tuple(layers[name]), size)


def _layer_index(root: Path) -> dict[str, Any]:
    """``models/layer_index.json``: each architecture's generalised layers, written from the built
    networks by ``python -m models.registry`` (the planner cannot build them without torch)."""
    path = root / LAYER_INDEX_PATH
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as error:
        raise CatalogueError(f"{path}: not JSON ({error}); rewrite it with: python -m models.registry") from None
    _expect(isinstance(index, dict), path, "top level", "must map architecture names to lists of layer names")
    return index


def _dataset(path: Path, name: str, entry: dict) -> DatasetSpec:
    where = f"DATASETS[{name!r}]"
    _expect(isinstance(entry.get("num_classes"), int) and entry["num_classes"] >= 0, path, f"{where}.num_classes",
            "must be an int (0: read from the data folder)")
    _expect(_is_list_of(entry.get("image_shape"), int), path, f"{where}.image_shape", "must be a list of ints")
    _expect(isinstance(entry.get("needs_root"), bool), path, f"{where}.needs_root", "must be true or false")
    summary = entry.get("summary", "")
    _expect(isinstance(summary, str), path, f"{where}.summary", "must be a string")
    _expect(isinstance(entry.get("train_images"), int) and entry["train_images"] >= 0, path, f"{where}.train_images",
            "must be the number of images of the official training part (0: read from the data folder)")
    prepared = entry.get("prepared", False)
    _expect(isinstance(prepared, bool), path, f"{where}.prepared", "must be true or false (default false)")
    return DatasetSpec(name, entry["num_classes"], tuple(entry["image_shape"]), entry["needs_root"], summary,
                       entry["train_images"], prepared)


def dataset_fingerprint(dataset: DatasetSpec, root: str | None) -> str:
    """What the files ``dataset``'s reader reads under ``root`` hold, for the stage hashes.

    ``NO_DATA_ROOT`` for a data set that reads files when no root is set: the plan still prints,
    and submit refuses it. Raises DatasetError when the files are missing or unreadable.
    """
    if dataset.needs_root and root is None:
        return NO_DATA_ROOT
    if dataset.name not in FINGERPRINTS:
        raise CatalogueError(
            f"data/files.py: FINGERPRINTS: data set {dataset.name!r} has no entry; add the function that "
            "fingerprints the files its reader reads"
        )
    return fingerprint(dataset.name, root)


def _item_type(default: Any) -> str | None:
    """A list param's item type, from its default's items (all of one type), so [2.5, 2, 2] is refused
    where the default is [4, 2, 2]."""
    if not isinstance(default, list) or not default:
        return None
    names = {type(item).__name__ for item in default}
    return names.pop() if len(names) == 1 and next(iter(names)) in TYPES else None


def _is_list_of(value: Any, item_type: type) -> bool:
    return isinstance(value, list) and all(isinstance(item, item_type) for item in value)


def _expect(condition: bool, path: Path, where: str, problem: str) -> None:
    if not condition:
        raise CatalogueError(f"{path}: {where}: {problem}")
