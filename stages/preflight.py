"""Checks what the planner cannot without torch, before anything is submitted.

The planner validates keys, types and ranges; whether a Tucker rank fits a tensor or FT's taps line
up depends on the models' tap shapes, and whether a checkpoint or torchvision weights file is there
and fits the architecture needs the file read. ``submit`` runs this first, so such a mistake is
refused in one line instead of failing hours later, after the teacher trained.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from data.errors import DatasetError
from data.layouts import check_image_files
from distill.base import MethodConfigError, MethodContext
from distill.composition import check_method
from models.pretrained import InitialWeightsError, fit_initial_state
from models.registry import build_model, tap_shapes
from pipeline.catalogue import Catalogue
from pipeline.plan import Plan, StageSpec
from pipeline.sweep import SweepError


def check_plan(plan: Plan, catalogue: Catalogue, names: Iterable[str] | None = None) -> None:
    """Raises SweepError naming the sweep file and the key of the first misfit: ``data_root`` for a
    data set that reads files when none is set, ``teacher.init``/``student.init`` for starting
    weights that are missing or do not fit, ``data_root`` again for a damaged image file of a
    data set a ``prepare_data`` stage will decode, ``methods.<name>.<key>`` for a method setting.
    ``names`` limits the check to those stages (the ones a submit will run)."""
    checked: set[str] = set()
    for spec in (plan.stages[name] for name in (plan.stages if names is None else names)):
        dataset_name = spec.settings["dataset"]["name"]
        if catalogue.datasets[dataset_name].needs_root and not spec.runtime.get("data_root"):
            raise SweepError(
                plan.sweep_path, "data_root",
                f"data set {dataset_name} reads files, but neither data_root nor KDBENCH_DATA is set; "
                "set one to the folder holding its files (on a cluster, a path every node sees)",
            )
        if spec.kind == "prepare_data":
            _check_image_files(plan, dataset_name, spec.runtime["data_root"])
        if spec.kind in ("train_teacher", "train_student") and spec.settings["training"].get("init"):
            _check_initial_weights(plan, spec, catalogue)
        if spec.kind != "train_student":
            continue
        dataset = catalogue.dataset(spec.settings["dataset"]["name"], spec.runtime.get("data_root"))
        image_shape, num_classes = tuple(dataset.image_shape), dataset.num_classes
        teacher_stage = spec.upstream.get("teacher")
        teacher_arch = plan.stages[teacher_stage].settings["arch"] if teacher_stage else None
        method = spec.settings["method"]
        key = repr((method, spec.settings["arch"], teacher_arch, image_shape))
        if key in checked:
            continue
        checked.add(key)
        data = spec.settings["dataset"]
        context = MethodContext(
            num_classes=num_classes,
            teacher_tap_shapes=tap_shapes(teacher_arch, image_shape, num_classes) if teacher_arch else {},
            student_tap_shapes=tap_shapes(spec.settings["arch"], image_shape, num_classes),
            # from the data set's declared size: CRD's nce_k is refused here, before the teacher trains
            train_size=dataset.training_split_size(float(data["val_fraction"]), data.get("subset_size")),
        )
        try:
            check_method(method, context)
        except MethodConfigError as error:
            pair = f"{teacher_arch}:{spec.settings['arch']}" if teacher_arch else spec.settings["arch"]
            raise SweepError(
                plan.sweep_path, f"methods.{error.key}",
                f"{error} (pair {pair}, dataset {spec.settings['dataset']['name']})",
            ) from None


def _check_image_files(plan: Plan, dataset_name: str, root: str) -> None:
    """Every image of a folder data set about to be decoded is whole by its bytes (``data.layouts``):
    a truncated JPEG is refused now, not when its ``prepare_data`` job reaches it."""
    try:
        check_image_files(dataset_name, root)
    except DatasetError as error:
        raise SweepError(plan.sweep_path, "data_root", str(error)) from None


def _check_initial_weights(plan: Plan, spec: StageSpec, catalogue: Catalogue) -> None:
    """The stage's ``init`` file is there and fits its architecture (on the meta device: no memory)."""
    role = "teacher" if spec.kind == "train_teacher" else "student"
    training, arch = spec.settings["training"], spec.settings["arch"]
    dataset = catalogue.dataset(spec.settings["dataset"]["name"], spec.runtime.get("data_root"))
    with torch.device("meta"):
        model = build_model(arch, dataset.num_classes, tuple(dataset.image_shape))
    try:
        imported = fit_initial_state(model, arch, training["init"], tuple(dataset.image_shape))
    except InitialWeightsError as error:
        raise SweepError(plan.sweep_path, f"{role}.init", str(error)) from None
    if imported.new_head and training["epochs"] == 0:
        raise SweepError(
            plan.sweep_path, f"{role}.epochs",
            f"0 uses the {imported.source} weights as they are, but their classifier does not fit data set "
            f"{dataset.name}'s {dataset.num_classes} classes; fine-tune (epochs >= 1) so the new head trains",
        )
