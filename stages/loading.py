"""Reading a stage's inputs: its data set, and the trained models its upstream stages left behind.

final.pt / best.pt of a training stage hold ``{"arch", "num_classes", "image_shape", "model",
"method", "method_record"}`` so that any later stage can rebuild the network without the sweep that made it.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data.registry import DatasetSplits, Splits, load_dataset
from distill.base import MethodContext
from distill.composition import build_method, changes_deployment
from models.pretrained import InitialWeightsError, load_initial_weights
from models.registry import build_model
from pipeline.initial_weights import checkpoint_sha256
from pipeline.plan import StageSpec
from pipeline.store import StageFolders
from stages.files import StageError, load_torch
from stages.prepare_data import load_prepared


def load_stage_data(
    spec: StageSpec, upstream: Mapping[str, StageFolders] | None = None, device: torch.device | None = None,
) -> Splits:
    """The stage's data set, refused unless its files are the ones the stage's hash was made from,
    resident on ``device`` when that is a GPU it fits on (``resident_data``).

    A stage with a ``data`` upstream (a ``prepared`` data set) reads the images its
    ``prepare_data`` stage decoded, from the verified folder in ``upstream``; the others read the
    data set's files. ``subset_size`` is in the settings only of stages that train on a few-data
    subset (the plan leaves it out when null, so that no other stage's hash moves).
    """
    dataset = spec.settings["dataset"]
    official_parts = None
    if "data" in spec.upstream:
        if upstream is None or "data" not in upstream:
            raise StageError(f"{spec.name}: reads data set {dataset['name']} from its prepare_data stage "
                             f"{spec.upstream['data']}, but was given no upstream folders")
        official_parts = load_prepared(upstream["data"].prepared_images)
    data = load_dataset(
        dataset["name"], spec.runtime.get("data_root"), float(dataset["val_fraction"]), int(dataset["split_seed"]),
        dataset.get("fingerprint"), subset_size=dataset.get("subset_size"), official_parts=official_parts,
    )
    return data if device is None else resident_data(data, device)


RESIDENT_SHARE = 0.25
"""The largest share of a GPU's free memory an in-memory data set may take there: CIFAR-100 takes
0.2 GB and Tiny ImageNet 1.4 GB, against 80 or 141 GB; the rest is the models' and the batches'."""


def resident_data(data: Splits, device: torch.device) -> Splits:
    """``data`` with its images on ``device`` when it is a GPU with room (``RESIDENT_SHARE`` of its
    free memory): then no training step copies a batch from the host. A streamed data set, any
    other device, or images too large stay where they are (a one-line note says so)."""
    if device.type != "cuda" or not isinstance(data, DatasetSplits):
        return data
    free, _ = torch.cuda.mem_get_info(device)
    if data.image_bytes > RESIDENT_SHARE * free:
        print(f"note: the data set's {data.image_bytes / 1e9:.1f} GB of images stay in host memory: more than "
              f"{RESIDENT_SHARE:.0%} of {device}'s {free / 1e9:.1f} GB free; each batch is copied to it", file=sys.stderr)
        return data
    return data.resident_on(device)


def new_classifier(
    arch: str, data: Splits, init: Mapping[str, Any] | None = None
) -> tuple[nn.Module, dict[str, Any] | None]:
    """``arch`` for ``data``, freshly initialised or holding the weights ``init`` imports (a resolved
    sweep init), and what was imported for the log (None when nothing was).

    A checkpoint whose bytes changed since the plan hashed them is refused: the stage's folder is
    named after the weights the plan saw.
    """
    model = build_model(arch, num_classes=data.num_classes, image_shape=tuple(data.image_shape))
    if init is None:
        return model, None
    if "sha256" in init and checkpoint_sha256(init["checkpoint"]) != init["sha256"]:
        raise StageError(f"checkpoint {init['checkpoint']} changed since the sweep was planned (its sha256 is no "
                         f"longer {init['sha256'][:12]}); plan the sweep again")
    try:
        imported = load_initial_weights(model, arch, init, tuple(data.image_shape))
    except InitialWeightsError as error:
        raise StageError(str(error)) from None
    return model, {"source": imported.source, "file": imported.file, "new_head": imported.new_head}


def model_state(
    arch: str, data: Splits, model: nn.Module, method: nn.Module | None = None,
    method_record: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What final.pt / best.pt hold. ``method_record`` (the method's settings and the context it was
    built in) lets a later stage rebuild a student that predicts through its method's modules."""
    return {
        "arch": arch,
        "num_classes": data.num_classes,
        "image_shape": tuple(data.image_shape),
        "model": model.state_dict(),
        "method": None if method is None else method.state_dict(),
        "method_record": None if method_record is None else dict(method_record),
    }


def method_context_record(context: MethodContext) -> dict[str, Any]:
    """The parts of a MethodContext a deployed model is rebuilt from (no pre-stage folder: a method
    whose deployment changes the network reads none)."""
    return {
        "num_classes": context.num_classes,
        "teacher_tap_shapes": dict(context.teacher_tap_shapes),
        "student_tap_shapes": dict(context.student_tap_shapes),
        "train_size": context.train_size,
    }


def _image_shape(saved: Mapping[str, Any]) -> tuple[int, int, int]:
    """The image shape a saved model was built for. Files written before architectures chose their
    stem by input size hold only ``in_channels``; they are all CIFAR ResNets, which ignore the side."""
    if "image_shape" in saved:
        return tuple(saved["image_shape"])
    return (saved["in_channels"], 32, 32)


@dataclass(frozen=True)
class TrainedModel:
    arch: str
    model: nn.Module


def load_classifier(weights_file: Path, device: torch.device, deployed: bool = True) -> TrainedModel:
    """A trained model from a final.pt / best.pt, in eval mode with gradients off: the network as it
    predicts, with its method's modules on top where the method deploys them (simkd), or with
    ``deployed`` False the architecture alone, whose taps are the ones its catalogue entry names.

    Building the network draws its throw-away initial weights from a forked generator, so loading
    takes no draws from the caller's: a student's own modules (a method's regressors) start the
    same whether its stage loads the teacher or reads the teacher's cached outputs instead."""
    saved: Mapping[str, Any] = load_torch(weights_file)
    with torch.random.fork_rng(devices=[]):
        model = build_model(saved["arch"], num_classes=saved["num_classes"], image_shape=_image_shape(saved))
        record = saved.get("method_record")
        method = None
        if deployed and record is not None and changes_deployment(record["settings"]):
            method = build_method(record["settings"], MethodContext(**record["context"]))
    model.load_state_dict(saved["model"])
    if method is not None:
        method.load_state_dict(saved["method"])
        model = method.deployed(model)
    model.requires_grad_(False)
    return TrainedModel(saved["arch"], model.to(device).eval())
