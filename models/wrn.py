"""Wide ResNets (Zagoruyko & Komodakis 2016, "Wide Residual Networks") as CRD/RepDistiller train them.

The layout is RepDistiller's ``models/wrn.py``: a 3x3 stem conv, three stages of pre-activation
blocks (BN-ReLU-conv twice; a 1x1 conv shortcut where the width changes, fed the activated input),
then BN-ReLU, global average pooling and the classifier; depth is 6n + 4, widths 16k, 32k, 64k.
Here the trailing BN-ReLU sits in ``pool`` so that each stage's output is exactly the feature
RepDistiller returns for it: ``stem`` is the stem conv's output (f0), ``layer1``..``layer3`` are
the stages' residual sums, before any BN or ReLU (f1..f3, the ``preact=False`` features), ``pool``
is the (N, 64k) vector after BN-ReLU and pooling (f4) and ``fc`` the logits.

``min_image_size`` is the product of the strides: the smallest side whose last stage still keeps
one pixel per downsampling step. ``import_state(arch, "repdistiller", state)`` renames the keys of
a RepDistiller checkpoint's model state dict (``block1.layer.0.convShortcut.weight``, ...).
"""
from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from models.repdistiller import initialise, renamed_state

ARCHITECTURES = {
    "wrn_16_2": {"depth": 16, "widen_factor": 2, "min_image_size": 4,
                 "taps": ["stem", "layer1", "layer2", "layer3", "pool", "fc"]},
    "wrn_40_1": {"depth": 40, "widen_factor": 1, "min_image_size": 4,
                 "taps": ["stem", "layer1", "layer2", "layer3", "pool", "fc"]},
    "wrn_40_2": {"depth": 40, "widen_factor": 2, "min_image_size": 4,
                 "taps": ["stem", "layer1", "layer2", "layer3", "pool", "fc"]},
}


def _conv3x3(in_channels: int, out_channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus the input; RepDistiller's (and the paper's) wide block.

    When the width changes the shortcut is a 1x1 conv applied to the *activated* input, as in the
    reference; otherwise the raw input is added.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels, 1)
        self.shortcut: nn.Conv2d | None = None
        if in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        activated = torch.relu(self.bn1(x))
        out = self.conv2(torch.relu(self.bn2(self.conv1(activated))))
        return out + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(nn.Module):
    """stem -> layer1 -> layer2 -> layer3 -> pool -> fc; the child names are the tap names."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int, in_channels: int):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"wide ResNet depth must be 6n + 4 with n >= 1, got {depth}")
        blocks = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = _conv3x3(in_channels, widths[0], 1)
        self.layer1 = self._stage(widths[0], widths[1], blocks, stride=1)
        self.layer2 = self._stage(widths[1], widths[2], blocks, stride=2)
        self.layer3 = self._stage(widths[2], widths[3], blocks, stride=2)
        self.pool = nn.Sequential(nn.BatchNorm2d(widths[3]), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(widths[3], num_classes)
        initialise(self, zero_classifier_bias=True)

    @staticmethod
    def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        first = PreActBlock(in_channels, out_channels, stride)
        return nn.Sequential(first, *[PreActBlock(out_channels, out_channels, 1) for _ in range(blocks - 1)])


    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x))


def build(arch: str, num_classes: int, image_shape: tuple[int, int, int]) -> WideResNet:
    """The network named ``arch`` in ``ARCHITECTURES`` for images of ``image_shape`` (C, H, W)."""
    entry = ARCHITECTURES[arch]
    return WideResNet(entry["depth"], entry["widen_factor"], num_classes, image_shape[0])


_BLOCK_KEY = re.compile(r"block([123])\.layer\.(\d+)\.(bn1|conv1|bn2|conv2|convShortcut)\.(\w+)")
_TOP_KEY = re.compile(r"(conv1|bn1|fc)\.(\w+)")
_TOP_RENAMES = {"conv1": "stem", "bn1": "pool.0", "fc": "fc"}


def _repdistiller_key(key: str) -> str:
    block = _BLOCK_KEY.fullmatch(key)
    if block:
        stage, index, module, tensor = block.groups()
        module = "shortcut" if module == "convShortcut" else module
        return f"layer{stage}.{index}.{module}.{tensor}"
    top = _TOP_KEY.fullmatch(key)
    if top:
        return f"{_TOP_RENAMES[top.group(1)]}.{top.group(2)}"
    raise ValueError(f"state key {key!r} is not a RepDistiller wide ResNet key (conv1, block1..3.layer.N, bn1, fc)")


def import_state(
    arch: str, source: str, state: dict[str, Tensor], image_shape: tuple[int, int, int] = (3, 32, 32)
) -> dict[str, Tensor]:
    """``state`` (a RepDistiller ``wrn_*`` model state dict) under this module's names."""
    return renamed_state(arch, source, state, _repdistiller_key)
