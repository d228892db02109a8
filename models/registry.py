"""Architecture names -> networks, and the facts about them that stages and methods need up front.

Each architecture file in ``models/`` declares its networks in an ``ARCHITECTURES`` literal (read by
the planner without torch) and has a ``build(arch, num_classes, image_shape)`` function; the image
shape lets a family pick its stem (a torchvision ResNet keeps its 7x7 stride-2 stem and max-pool for
ImageNet-size inputs and takes a 3x3 stride-1 one on 32 px images). A family may also have
``import_state(arch, source, state)``, which renames a foreign state dict ("torchvision" weights, a
"repdistiller" checkpoint) into its own keys. Adding a file means one line in ``_FAMILIES`` and
rewriting the planner's layer index (``python -m models.registry``); a name declared by two files
is an error at import.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn

from models import (
    mobilenetv2_cifar,
    resnet_cifar,
    shufflenet_cifar,
    small_nets,
    taps,
    torchvision_nets,
    vgg_cifar,
    wrn,
)
from models.taps import FeatureTaps, Tap

_FAMILIES: tuple[ModuleType, ...] = (
    resnet_cifar, wrn, vgg_cifar, mobilenetv2_cifar, shufflenet_cifar, torchvision_nets, small_nets,
)


def _index_by_name(families: tuple[ModuleType, ...]) -> dict[str, ModuleType]:
    index: dict[str, ModuleType] = {}
    for family in families:
        for arch in family.ARCHITECTURES:
            if arch in index:
                raise ValueError(f"architecture {arch!r} is declared in both {index[arch].__name__} and {family.__name__}")
            index[arch] = family
    return index


_FAMILY_OF = _index_by_name(_FAMILIES)

IMPORT_SOURCES = ("torchvision", "repdistiller")
"""Whose state dicts ``import_state`` can rename: torchvision's weights files, and the CIFAR teacher
checkpoints that RepDistiller (the CRD benchmark's code) publishes as ``{"model": state_dict}``."""


def architecture_names() -> list[str]:
    return sorted(_FAMILY_OF)


def _family(arch: str) -> ModuleType:
    if arch not in _FAMILY_OF:
        raise KeyError(f"unknown architecture {arch!r}; allowed: {', '.join(architecture_names())}")
    return _FAMILY_OF[arch]


def build_model(arch: str, num_classes: int, image_shape: tuple[int, int, int]) -> nn.Module:
    """A freshly initialised ``arch`` for images of ``image_shape`` (C, H, W); builds on whatever
    device is current (``meta`` included)."""
    return _family(arch).build(arch, num_classes, tuple(image_shape))


def import_state(
    arch: str, source: str, state: Mapping[str, Tensor], image_shape: tuple[int, int, int]
) -> dict[str, Tensor]:
    """``state``, a state dict in ``source``'s key names (``IMPORT_SOURCES``), renamed (and, where the
    network for ``image_shape`` has another stem than the file's, adapted) to ``arch``'s.

    ValueError (one line, naming what can be imported) when ``arch``'s family reads no such files.
    """
    family = _family(arch)
    if not hasattr(family, "import_state"):
        raise ValueError(f"architecture {arch!r} cannot import {source} weights: {family.__name__} has no import_state")
    return family.import_state(arch, source, dict(state), image_shape=tuple(image_shape))


def generalised_layers(arch_or_model: str | nn.Module) -> tuple[str, ...]:
    """The generalised layers (``models.taps.generalised_layers``) of a model or of architecture ``arch``.

    For a name the model is built on the ``meta`` device: the names do not depend on the classes or
    input channels, and nothing is allocated.
    """
    if isinstance(arch_or_model, str):
        size = _family(arch_or_model).ARCHITECTURES[arch_or_model]["min_image_size"]
        with torch.device("meta"):
            arch_or_model = build_model(arch_or_model, num_classes=10, image_shape=(3, max(size, 32), max(size, 32)))
    return taps.generalised_layers(arch_or_model)


def tap_shapes(arch: str, image_shape: tuple[int, int, int], num_classes: int) -> dict[Tap, tuple[int, ...]]:
    """Per-sample output shape of every tap of ``arch`` for images of ``image_shape`` (C, H, W).

    Keyed by each declared tap name, each generalised layer's name and each generalised layer's
    index, so a method finds its tap's shape however the sweep named it. Methods size their
    projections from these before any weights exist; the forward pass runs on the ``meta`` device,
    so it allocates no memory and takes milliseconds even for resnet110.
    """
    with torch.device("meta"):
        model = build_model(arch, num_classes, image_shape).eval()
        images = torch.empty((1, *image_shape))
    layers = taps.generalised_layers(model)
    names = dict.fromkeys([*_family(arch).ARCHITECTURES[arch]["taps"], *layers])
    keys: list[Tap] = [*names, *range(len(layers))]
    with torch.no_grad(), FeatureTaps(model, keys) as tapped:
        _, features = tapped(images)
    return {key: tuple(features[key].shape[1:]) for key in keys}


def parameter_count(model: nn.Module) -> int:
    """All parameters, trainable or not, as the CRD tables count them."""
    return sum(parameter.numel() for parameter in model.parameters())


LAYER_INDEX = Path(__file__).with_name("layer_index.json")
"""Every architecture's generalised layers, for the torch-free planner (``pipeline/catalogue.py``).

The module tree is the truth; this file is its copy that the planner can read in a millisecond.
``python -m models.registry`` rewrites it, and tests/test_layers.py fails when the two differ.
"""


def layer_index() -> dict[str, list[str]]:
    """What ``LAYER_INDEX`` should hold: each architecture's generalised layers, by name."""
    return {arch: list(generalised_layers(arch)) for arch in architecture_names()}


def write_layer_index() -> None:
    LAYER_INDEX.write_text(json.dumps(layer_index(), indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    write_layer_index()
    print(f"wrote {LAYER_INDEX} ({len(architecture_names())} architectures)")
