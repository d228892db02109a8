"""Where a teacher's or student's weights start: ``init`` in the sweep, checked and hashed without torch.

Three values, for the three ways KD papers start a network:

* ``scratch``: freshly initialised (the default; such stages keep the hashes they always had);
* ``{torchvision: WEIGHTS}``: torchvision's published weights for the same architecture, by the
  weights enum's member name (``IMAGENET1K_V1``, or ``ResNet34_Weights.IMAGENET1K_V1``, or
  ``DEFAULT``), read from ``$TORCH_HOME``'s hub cache or from ``file:``; never downloaded: a stage
  must not depend on a network that cluster nodes often do not have;
* ``{checkpoint: PATH}``: a state dict file, ours or RepDistiller's ``{"model": ...}`` CIFAR
  teachers, a relative path being relative to the sweep file.

A stage's hash covers what the weights are, not where they lie: the torchvision member name (its
file is fixed by it: torchvision names each file after its own hash), or the checkpoint's sha256.
So moving a checkpoint keeps every stage, and overwriting it with other weights makes new stages.
Whether the file fits the architecture needs torch: ``stages/preflight.py`` checks that at submit.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline.store import file_sha256

SCRATCH = "scratch"
SOURCES = ("torchvision", "checkpoint")
_HASHED: dict[tuple[str, int, int], str] = {}
"""sha256 of checkpoints already read in this process, by (path, size, mtime_ns)."""


class InitValueError(ValueError):
    """An ``init`` value of no allowed form; ``pipeline.fields`` turns it into a FieldError."""

    def __init__(self, problem: str, allowed: tuple[str, ...]):
        super().__init__(problem)
        self.problem, self.allowed = problem, allowed


def check_init(value: Any) -> str | dict[str, str]:
    """``value`` in canonical form, or InitValueError naming the allowed forms."""
    allowed = (SCRATCH, "{torchvision: WEIGHTS_NAME}", "{torchvision: WEIGHTS_NAME, file: PATH}", "{checkpoint: PATH}")
    if value == SCRATCH:
        return SCRATCH
    if not isinstance(value, dict) or not value:
        raise InitValueError(f"{value!r} is not a weights source", allowed)
    source = next((key for key in SOURCES if key in value), None)
    extra = sorted(set(value) - {source, *(("file",) if source == "torchvision" else ())})
    if source is None or extra:
        raise InitValueError(f"{value!r} has unknown keys {extra or sorted(value)}", allowed)
    for key, item in value.items():
        if not isinstance(item, str) or not item:
            raise InitValueError(f"{key} must be a non-empty string, got {item!r}", allowed)
    return dict(value)


def resolve_init(init: str | dict[str, str], base_folder: str) -> dict[str, str] | None:
    """What a stage needs to load ``init``: None for scratch, else the source with absolute paths
    (relative ones are relative to ``base_folder``, the sweep file's) and a checkpoint's sha256.

    Raises FileNotFoundError naming the checkpoint when it is missing.
    """
    if init == SCRATCH:
        return None
    resolved = dict(init)
    for key in ("checkpoint", "file"):
        if key in resolved:
            resolved[key] = os.path.abspath(os.path.join(base_folder, os.path.expanduser(resolved[key])))
    if "checkpoint" in resolved:
        resolved["sha256"] = checkpoint_sha256(resolved["checkpoint"])
    return resolved


def hashed_init(resolved: dict[str, str]) -> dict[str, str]:
    """The part of a resolved init that says what the weights are: no paths."""
    if "checkpoint" in resolved:
        return {"checkpoint_sha256": resolved["sha256"]}
    return {"torchvision": resolved["torchvision"]}


def checkpoint_sha256(path: str) -> str:
    """sha256 of the file's bytes (``pipeline.store.file_sha256``), read once per process while its
    size and mtime stay the same: a plan asks once per experiment, and a ResNet-101 checkpoint
    (170 MB) takes about 0.2 s to hash on a local disk."""
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = file_sha256(Path(path))
    return _HASHED[key]
