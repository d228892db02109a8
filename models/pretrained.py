"""Starting weights a network imports: torchvision's published weights, or a checkpoint file.

``pipeline/initial_weights.py`` checks and hashes the sweep's ``init``; this module finds the file,
reads it without running code (``weights_only``), renames foreign keys through the architecture's
``import_state`` and loads the result, refusing in one line anything that does not fit. Both
``stages/preflight.py`` (on the ``meta`` device: no memory, before anything is queued) and the
training stages call ``fit_initial_state``, so what submit accepted is what the job loads.

The classifier (``fc``, by the architecture naming contract) is the one part allowed not to fit:
ImageNet weights have 1,000 outputs and a CIFAR-100 run needs 100, so a head of another shape keeps
its fresh initialisation and is trained (``ImportedState.new_head``). Every other tensor must be in
the file with its exact shape.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from models.registry import import_state

HEAD = "fc"
"""The classifier module's name in every kdbench architecture."""


class InitialWeightsError(ValueError):
    """Starting weights that cannot be loaded; the message names the file and what to do."""


@dataclass(frozen=True)
class ImportedState:
    """A state dict in the model's own keys, where it came from, and whether the head is left fresh."""

    state: dict[str, Tensor]
    source: str
    file: str
    new_head: bool


def torchvision_weights_file(arch: str, weights_name: str, file: str | None = None) -> tuple[str, Path]:
    """The full enum name of torchvision's weights ``weights_name`` for ``arch`` and the local file
    that holds them: ``file`` when given, else torch hub's cache (``$TORCH_HOME/hub/checkpoints``),
    where torchvision itself would keep them. Nothing is downloaded: a missing file is an
    InitialWeightsError naming what to place where.
    """
    from torchvision import models as torchvision_models

    try:
        enum = torchvision_models.get_model_weights(arch)
    except (ValueError, KeyError):
        raise InitialWeightsError(f"torchvision publishes no weights for {arch!r}; use init: scratch or a checkpoint") from None
    member = weights_name.removeprefix(f"{enum.__name__}.")
    names = [weights.name for weights in enum]
    if member != "DEFAULT" and member not in names:
        raise InitialWeightsError(f"{weights_name!r} is not one of torchvision's {enum.__name__}; allowed: {', '.join(names)}, DEFAULT")
    weights = enum.DEFAULT if member == "DEFAULT" else enum[member]
    full_name = f"{enum.__name__}.{weights.name}"
    filename = os.path.basename(weights.url)
    path = Path(file) if file is not None else Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not path.is_file():
        raise InitialWeightsError(
            f"torchvision weights {full_name} are not on this machine: place {filename} (from {weights.url}) at "
            f"{path}, or give its path as init.file; kdbench never downloads at run time"
        )
    return full_name, path


def read_state_file(path: Path) -> tuple[dict[str, Tensor], str | None]:
    """The state dict in ``path`` and the architecture it names, if any (kdbench's own final.pt).

    Accepts a bare state dict, ``{"model": state}`` (kdbench's final.pt, RepDistiller's
    checkpoints) and ``{"state_dict": state}``; a ``module.`` prefix (a DataParallel model's)
    is stripped. Unpickling is ``weights_only``: a checkpoint cannot run code.
    """
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InitialWeightsError(f"checkpoint {path} does not exist") from None
    except Exception as error:  # torch.load raises many types for a file that is not a checkpoint
        raise InitialWeightsError(f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: "
                                  f"{' '.join(str(error).split())[:200]})") from None
    arch = content.get("arch") if isinstance(content, dict) and isinstance(content.get("arch"), str) else None
    for key in ("model", "state_dict"):
        if isinstance(content, dict) and isinstance(content.get(key), dict):
            content = content[key]
            break
    if not isinstance(content, dict) or not content or not all(isinstance(value, Tensor) for value in content.values()):
        raise InitialWeightsError(f"{path} holds no state dict (a dict of tensors, or one under 'model' or 'state_dict')")
    if all(key.startswith("module.") for key in content):
        content = {key.removeprefix("module."): value for key, value in content.items()}
    return dict(content), arch


def fit_initial_state(
    model: nn.Module, arch: str, init: Mapping[str, Any], image_shape: tuple[int, int, int]
) -> ImportedState:
    """``init`` (a resolved sweep init: ``pipeline/initial_weights.py``) read and fitted to ``model``.

    A checkpoint in the model's own keys loads as it is; otherwise its keys are renamed as
    RepDistiller's (``import_state``). torchvision weights are always renamed from torchvision's keys.
    InitialWeightsError names the first missing and unexpected keys when the file does not fit.
    """
    if "torchvision" in init:
        name, path = torchvision_weights_file(arch, init["torchvision"], init.get("file"))
        state = _renamed(arch, "torchvision", read_state_file(path)[0], path, image_shape)
        return _fitted(model, arch, state, f"torchvision {name}", path)
    path = Path(init["checkpoint"])
    state, saved_arch = read_state_file(path)
    if saved_arch is not None and saved_arch != arch:
        raise InitialWeightsError(f"checkpoint {path} holds a {saved_arch}, not a {arch}")
    if _same_keys(model, state):
        return _fitted(model, arch, state, "checkpoint", path)
    try:
        renamed = import_state(arch, "repdistiller", state, image_shape)
    except (ValueError, KeyError):
        # Neither kdbench's keys nor RepDistiller's: name the keys against the model's own.
        return _fitted(model, arch, state, "checkpoint", path)
    return _fitted(model, arch, renamed, "RepDistiller checkpoint", path)


def load_initial_weights(
    model: nn.Module, arch: str, init: Mapping[str, Any], image_shape: tuple[int, int, int]
) -> ImportedState:
    """Fits ``init`` to ``model`` (built for ``image_shape``) and loads it in place (the head stays
    fresh where it differs)."""
    imported = fit_initial_state(model, arch, init, image_shape)
    model.load_state_dict(imported.state, strict=not imported.new_head)
    return imported


def _same_keys(model: nn.Module, state: Mapping[str, Tensor]) -> bool:
    return set(state) == set(model.state_dict())


def _renamed(
    arch: str, source: str, state: dict[str, Tensor], path: Path, image_shape: tuple[int, int, int]
) -> dict[str, Tensor]:
    try:
        return import_state(arch, source, state, image_shape)
    except (ValueError, KeyError) as error:
        raise InitialWeightsError(f"{path} cannot be read as {source} weights for {arch}: {error}") from None


def _fitted(model: nn.Module, arch: str, state: dict[str, Tensor], source: str, path: Path) -> ImportedState:
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        raise InitialWeightsError(
            f"{source} {path} does not fit {arch}: missing keys {_first(missing)}; unexpected keys {_first(unexpected)}"
        )
    misshapen = [key for key in expected if tuple(state[key].shape) != tuple(expected[key].shape)]
    head = [key for key in misshapen if key.startswith(f"{HEAD}.")]
    others = [key for key in misshapen if key not in head]
    if others:
        key = others[0]
        raise InitialWeightsError(
            f"{source} {path} does not fit {arch}: {key} is {tuple(state[key].shape)} in the file and "
            f"{tuple(expected[key].shape)} in the model ({len(others)} tensors differ)"
        )
    kept = {key: value for key, value in state.items() if key not in head}
    return ImportedState(kept, source, str(path), new_head=bool(head))


def _first(keys: list[str], count: int = 3) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - count} more" if len(keys) > count else ""
    return ", ".join(keys[:count]) + more
