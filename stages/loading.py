"""Reading a stage's inputs: its data set, and the trained models its upstream stages left behind.

final.pt / best.pt of a training stage hold ``{"arch", "num_classes", "in_channels", "model",
"method"}`` so that any later stage can rebuild the network without the sweep that made it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from data.registry import DatasetSplits, load_dataset
from models.registry import build_model
from pipeline.plan import StageSpec
from stages.files import load_torch


def load_stage_data(spec: StageSpec) -> DatasetSplits:
    """The stage's data set, refused unless its files are the ones the stage's hash was made from."""
    dataset = spec.settings["dataset"]
    return load_dataset(
        dataset["name"], spec.runtime.get("data_root"), float(dataset["val_fraction"]), int(dataset["split_seed"]),
        dataset.get("fingerprint"),
    )


def new_classifier(arch: str, data: DatasetSplits) -> nn.Module:
    return build_model(arch, num_classes=data.num_classes, in_channels=data.image_shape[0])


def model_state(arch: str, data: DatasetSplits, model: nn.Module, method: nn.Module | None = None) -> dict[str, Any]:
    return {
        "arch": arch,
        "num_classes": data.num_classes,
        "in_channels": data.image_shape[0],
        "model": model.state_dict(),
        "method": None if method is None else method.state_dict(),
    }


@dataclass(frozen=True)
class TrainedModel:
    arch: str
    model: nn.Module


def load_classifier(weights_file: Path, device: torch.device) -> TrainedModel:
    """A trained model from a final.pt / best.pt, in eval mode with gradients off."""
    saved: Mapping[str, Any] = load_torch(weights_file)
    model = build_model(saved["arch"], num_classes=saved["num_classes"], in_channels=saved["in_channels"])
    model.load_state_dict(saved["model"])
    model.requires_grad_(False)
    return TrainedModel(saved["arch"], model.to(device).eval())
