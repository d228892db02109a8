"""Architecture names -> networks, and the facts about them that stages and methods need up front.

Each architecture file in ``models/`` declares its networks in an ``ARCHITECTURES`` literal (read by
the planner without torch) and has a ``build(arch, num_classes, in_channels)`` function. Adding a
file means one line in ``_FAMILIES``; a name declared by two files is an error at import.
"""
from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from models import resnet_cifar, taps
from models.taps import FeatureTaps, Tap

_FAMILIES: tuple[ModuleType, ...] = (resnet_cifar,)


def _index_by_name(families: tuple[ModuleType, ...]) -> dict[str, ModuleType]:
    index: dict[str, ModuleType] = {}
    for family in families:
        for arch in family.ARCHITECTURES:
            if arch in index:
                raise ValueError(f"architecture {arch!r} is declared in both {index[arch].__name__} and {family.__name__}")
            index[arch] = family
    return index


_FAMILY_OF = _index_by_name(_FAMILIES)


def architecture_names() -> list[str]:
    return sorted(_FAMILY_OF)


def _family(arch: str) -> ModuleType:
    if arch not in _FAMILY_OF:
        raise KeyError(f"unknown architecture {arch!r}; allowed: {', '.join(architecture_names())}")
    return _FAMILY_OF[arch]


def build_model(arch: str, num_classes: int, in_channels: int) -> nn.Module:
    """A freshly initialised ``arch``; builds on whatever device is current (``meta`` included)."""
    return _family(arch).build(arch, num_classes, in_channels)


def generalised_layers(arch_or_model: str | nn.Module) -> tuple[str, ...]:
    """The generalised layers (``models.taps.generalised_layers``) of a model or of architecture ``arch``.

    For a name the model is built on the ``meta`` device: the names do not depend on the classes or
    input channels, and nothing is allocated.
    """
    if isinstance(arch_or_model, str):
        with torch.device("meta"):
            arch_or_model = build_model(arch_or_model, num_classes=10, in_channels=3)
    return taps.generalised_layers(arch_or_model)


def tap_shapes(arch: str, image_shape: tuple[int, int, int], num_classes: int) -> dict[Tap, tuple[int, ...]]:
    """Per-sample output shape of every tap of ``arch`` for images of ``image_shape`` (C, H, W).

    Keyed by each declared tap name, each generalised layer's name and each generalised layer's
    index, so a method finds its tap's shape however the sweep named it. Methods size their
    projections from these before any weights exist; the forward pass runs on the ``meta`` device,
    so it allocates no memory and takes milliseconds even for resnet110.
    """
    with torch.device("meta"):
        model = build_model(arch, num_classes, image_shape[0]).eval()
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
