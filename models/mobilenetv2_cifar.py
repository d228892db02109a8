"""MobileNetV2 at half width, the CRD table's "MobileNetV2" (RepDistiller's ``mobile_half``).

The reference is RepDistiller's ``models/mobilenetv2.py`` (Sandler et al. 2018, "MobileNetV2:
Inverted Residuals and Linear Bottlenecks", in the CIFAR form of Jin et al.'s route-constrained KD):
a stride-2 3x3 stem, seven groups of inverted residual blocks (expansion 6; the first group 1, and
unlike torchvision it keeps its 1x1 expansion conv even then), a 1x1 conv to 1280 channels, average
pooling and one Linear. Width multiplier 0.5 halves every width except the 1280.

RepDistiller taps the output of groups 1, 2, 4 and 6 (f1..f4); the stages here group the blocks so
their outputs are exactly those: ``layer1`` = groups 0-1, ``layer2`` = group 2, ``layer3`` = groups
3-4, ``layer4`` = groups 5-6. A block ends in BN with no ReLU (the linear bottleneck), so every stage
tap is pre-activation by design. ``stem`` is the stem's post-ReLU output (f0); ``pool`` holds the 1x1
conv-BN-ReLU head and the pooling, giving the (N, 1280) vector (f5); ``fc`` the logits.
``min_image_size`` is the product of the four stride-2 steps. ``import_state(arch, "repdistiller",
state)`` renames ``conv1``, ``blocks.G.I.conv.*``, ``conv2`` and ``classifier.0``.
"""
from __future__ import annotations

import re

from torch import Tensor, nn

from models.repdistiller import initialise, renamed_state

ARCHITECTURES = {
    "mobilenetv2": {"expansion": 6, "width": 0.5, "min_image_size": 16,
                    "taps": ["stem", "layer1", "layer2", "layer3", "layer4", "pool", "fc"]},
}

_GROUPS = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1),
           (None, 160, 3, 2), (None, 320, 1, 1))
"""(expansion, channels, blocks, first stride) per group; None is the architecture's expansion."""
_STAGE_OF_GROUP = (1, 1, 2, 3, 3, 4, 4)
_HEAD_CHANNELS = 1280


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, 1x1 project (no ReLU after); adds the input when shapes agree."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


def _group_layout(expansion: int, width: float) -> list[tuple[int, list[InvertedResidual]]]:
    """(stage, blocks) for each of RepDistiller's seven groups, in order."""
    channels = int(32 * width)
    layout = []
    for stage, (group_expansion, group_channels, blocks, stride) in zip(_STAGE_OF_GROUP, _GROUPS):
        out_channels = int(group_channels * width)
        group = []
        for block in range(blocks):
            group.append(InvertedResidual(channels, out_channels, stride if block == 0 else 1,
                                          group_expansion or expansion))
            channels = out_channels
        layout.append((stage, group))
    return layout


class MobileNetV2Cifar(nn.Module):
    """stem -> layer1 .. layer4 -> pool -> fc; the child names are the tap names."""

    def __init__(self, expansion: int, width: float, num_classes: int, in_channels: int):
        super().__init__()
        stem_channels = int(32 * width)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem_channels, 3, 2, 1, bias=False),
                                  nn.BatchNorm2d(stem_channels), nn.ReLU())
        stages: dict[int, list[InvertedResidual]] = {}
        for stage, group in _group_layout(expansion, width):
            stages.setdefault(stage, []).extend(group)
        for stage, blocks in stages.items():
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
        last = int(_GROUPS[-1][1] * width)
        self.pool = nn.Sequential(nn.Conv2d(last, _HEAD_CHANNELS, 1, bias=False), nn.BatchNorm2d(_HEAD_CHANNELS),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(_HEAD_CHANNELS, num_classes)
        initialise(self, classifier_std=0.01, zero_classifier_bias=True)


    def forward(self, x: Tensor) -> Tensor:
        for stage in (self.stem, self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
        return self.fc(self.pool(x))


def build(arch: str, num_classes: int, image_shape: tuple[int, int, int]) -> MobileNetV2Cifar:
    """The network named ``arch`` in ``ARCHITECTURES`` for images of ``image_shape`` (C, H, W)."""
    entry = ARCHITECTURES[arch]
    return MobileNetV2Cifar(entry["expansion"], entry["width"], num_classes, image_shape[0])


def _block_places() -> list[tuple[int, int]]:
    """(stage, first index in it) of each group: where RepDistiller's ``blocks.G.I`` lands."""
    places, filled = [], dict.fromkeys(_STAGE_OF_GROUP, 0)
    for stage, (_, _, blocks, _) in zip(_STAGE_OF_GROUP, _GROUPS):
        places.append((stage, filled[stage]))
        filled[stage] += blocks
    return places


_PLACES = _block_places()
_BLOCK_KEY = re.compile(r"blocks\.([0-6])\.(\d+)\.conv\.([0-7])\.(\w+)")
_TOP_KEY = re.compile(r"(conv1\.[01]|conv2\.[01]|classifier\.0)\.(\w+)")
_TOP_RENAMES = {"conv1.0": "stem.0", "conv1.1": "stem.1", "conv2.0": "pool.0", "conv2.1": "pool.1",
                "classifier.0": "fc"}


def _repdistiller_key(key: str) -> str:
    block = _BLOCK_KEY.fullmatch(key)
    if block:
        stage, first = _PLACES[int(block.group(1))]
        return f"layer{stage}.{first + int(block.group(2))}.conv.{block.group(3)}.{block.group(4)}"
    top = _TOP_KEY.fullmatch(key)
    if top:
        return f"{_TOP_RENAMES[top.group(1)]}.{top.group(2)}"
    raise ValueError(
        f"state key {key!r} is not a RepDistiller MobileNetV2 key (conv1.0/1, blocks.G.I.conv.J, conv2.0/1, classifier.0)"
    )


def import_state(
    arch: str, source: str, state: dict[str, Tensor], image_shape: tuple[int, int, int] = (3, 32, 32)
) -> dict[str, Tensor]:
    """``state`` (a RepDistiller ``mobile_half`` model state dict) under this module's names."""
    return renamed_state(arch, source, state, _repdistiller_key)
