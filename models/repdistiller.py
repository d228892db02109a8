"""What the CIFAR families ported from RepDistiller (the CRD benchmark's code) share: its weight
initialisation, and turning its checkpoints' key names into ours.

Each family keeps its own ``_repdistiller_key`` (the names differ per network); this module owns the
loop around it and the one rule that only RepDistiller files can be read by these families.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn


def initialise(model: nn.Module, classifier_std: float | None = None, zero_classifier_bias: bool = False) -> None:
    """RepDistiller's initialisation: convolutions N(0, 2 / fan_out) with zero bias, BatchNorm (1, 0).

    The classifier differs between its files: ``classifier_std`` draws its weight from N(0, std^2)
    (VGG, MobileNetV2 use 0.01), None keeps PyTorch's default; ``zero_classifier_bias`` zeroes its bias.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            if classifier_std is not None:
                nn.init.normal_(module.weight, std=classifier_std)
            if zero_classifier_bias:
                nn.init.zeros_(module.bias)


def renamed_state(
    arch: str, source: str, state: dict[str, Tensor], rename: Callable[[str], str]
) -> dict[str, Tensor]:
    """``state`` (a RepDistiller model state dict for ``arch``) with every key passed through ``rename``.

    ValueError when ``source`` is not ``repdistiller``: these networks exist only in RepDistiller's form.
    """
    if source != "repdistiller":
        raise ValueError(f"cannot import {source!r} weights into {arch}; allowed: repdistiller")
    return {rename(key): value for key, value in state.items()}
