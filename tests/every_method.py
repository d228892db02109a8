"""One sweep that trains every method of the catalogue, and the compositions the papers report, for an epoch.

Both backends' tests submit it: a method that plans but cannot train end to end (a missing tap, a
pre-stage that is never wired, an evaluation that cannot rebuild the student) fails here, whatever
the method's own unit tests say. New methods join by being in the catalogue.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipeline.catalogue import load_catalogue

COMPOSITIONS = ("crd+kd", "at+kd", "kd+supcon")
"""The CRD table's "X+KD" rows and ConKD's kd+supcon."""

SETTINGS_FOR_ONE_EPOCH_ON_DIGITS: dict[str, dict[str, Any]] = {
    "ft": {"paraphraser_epochs": 1},
    "crd": {"nce_k": 256},  # digits has about 1,300 training images, fewer than CRD's 16,384 negatives
}


def every_method() -> list[str]:
    """Every method of the catalogue, then the compositions whose parts it has."""
    methods = sorted(load_catalogue().methods)
    return [*methods, *(value for value in COMPOSITIONS if all(part in methods for part in value.split("+")))]


def write_every_method_sweep(folder: Path, name: str, resources: dict[str, Any] | None = None) -> Path:
    """resnet20 -> resnet8x0.25 on digits, every method, one student epoch, one teacher epoch."""
    sweep = {
        "name": name,
        "axes": {"dataset": ["digits"], "pair": ["resnet20:resnet8x0.25"], "method": every_method(), "seed": [0]},
        "defaults": {
            "teacher": {"epochs": 2, "lr_schedule": "cosine"},
            "student": {"epochs": 1, "lr_schedule": "cosine"},
            "methods": SETTINGS_FOR_ONE_EPOCH_ON_DIGITS,
        },
        "resources": resources or {"default": {"cpus": 1}},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path
