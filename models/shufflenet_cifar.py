"""CIFAR ShuffleNets V1 and V2 as CRD/RepDistiller train them (its ``ShuffleV1``, ``ShuffleV2``).

References: RepDistiller's ``models/ShuffleNetv1.py`` (Zhang et al. 2018, "ShuffleNet", groups 3,
stages 240/480/960 with 4/8/4 blocks) and ``models/ShuffleNetv2.py`` (Ma et al. 2018, "ShuffleNet
V2", size 1x: stages 116/232/464 with a down-sampling block and 3/7/3 basic blocks, a 1x1 conv head
to 1024). Both use a 1x1 stem conv to 24 channels (no max-pool), and each stage starts at stride 2.
RepDistiller leaves these networks at PyTorch's default initialisation, and so does this file.

Taps: ``stem`` is the stem's post-ReLU output (f0); ``layer1``..``layer3`` are the stages' outputs,
post-ReLU as RepDistiller's ``preact=False`` features (f1..f3; for V2 the channel-shuffled concat of
the untouched half and the activated branch); ``pool`` is the (N, D) pooled vector (f4; for V2 it
holds the conv-BN-ReLU head too); ``fc`` the logits. ``min_image_size`` is the product of the
three stride-2 steps. ``import_state(arch, "repdistiller", state)`` renames ``conv1``, ``bn1``,
(V2) ``conv2``, ``bn2`` and ``linear``; the stage keys already agree.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models.repdistiller import renamed_state

ARCHITECTURES = {
    "shufflenetv1": {"version": 1, "stages": [240, 480, 960], "blocks": [4, 8, 4], "groups": 3,
                     "min_image_size": 8, "taps": ["stem", "layer1", "layer2", "layer3", "pool", "fc"]},
    "shufflenetv2": {"version": 2, "stages": [116, 232, 464, 1024], "blocks": [3, 7, 3],
                     "min_image_size": 8, "taps": ["stem", "layer1", "layer2", "layer3", "pool", "fc"]},
}

_STEM_CHANNELS = 24


def _shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave the channels of ``groups`` groups, so the next grouped conv mixes them."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleV1Block(nn.Module):
    """Grouped 1x1, shuffle, depthwise 3x3, grouped 1x1; added to the input, or at stride 2
    concatenated with its 3x3 average pool; ReLU last. The 24-channel stem feeds an ungrouped 1x1."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int):
        super().__init__()
        mid = out_channels // 4
        self.stride = stride
        self.first_groups = 1 if in_channels == _STEM_CHANNELS else groups
        self.conv1 = nn.Conv2d(in_channels, mid, kernel_size=1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_channels, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        out = _shuffle(torch.relu(self.bn1(self.conv1(x))), self.first_groups)
        out = self.bn3(self.conv3(torch.relu(self.bn2(self.conv2(out)))))
        if self.stride == 2:
            return torch.relu(torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1))
        return torch.relu(out + x)


class ShuffleV2Block(nn.Module):
    """Half the channels pass untouched; the other half go 1x1, depthwise 3x3, 1x1 (ReLU last); then
    concatenate and shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, kernel_size=3, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x: Tensor) -> Tensor:
        kept, branch = x.chunk(2, dim=1)
        branch = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(branch)))))
        return _shuffle(torch.cat([kept, torch.relu(self.bn3(self.conv3(branch)))], 1), 2)


class ShuffleV2DownBlock(nn.Module):
    """Stride-2 block of V2: both branches see the whole input (left: depthwise 3x3, 1x1; right: 1x1,
    depthwise 3x3, 1x1), each giving half the output channels; concatenate and shuffle."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        half = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, half, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(in_channels, half, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        self.conv4 = nn.Conv2d(half, half, 3, stride=2, padding=1, groups=half, bias=False)
        self.bn4 = nn.BatchNorm2d(half)
        self.conv5 = nn.Conv2d(half, half, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(half)

    def forward(self, x: Tensor) -> Tensor:
        left = torch.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(torch.relu(self.bn3(self.conv3(x)))))
        right = torch.relu(self.bn5(self.conv5(right)))
        return _shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetCifar(nn.Module):
    """stem -> layer1 -> layer2 -> layer3 -> pool -> fc; the child names are the tap names.

    ``stages`` are the three stage widths (V2: and the head width); V1 needs ``groups``.
    """

    def __init__(self, version: int, stages: list[int], blocks: list[int], num_classes: int, in_channels: int,
                 groups: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, _STEM_CHANNELS, kernel_size=1, bias=False),
                                  nn.BatchNorm2d(_STEM_CHANNELS), nn.ReLU())
        width = _STEM_CHANNELS
        for index, (stage_width, count) in enumerate(zip(stages, blocks), start=1):
            if version == 1:
                # The first block's branch only adds what the pooled shortcut does not carry.
                stage = [ShuffleV1Block(width, stage_width - width, 2, groups)]
                stage += [ShuffleV1Block(stage_width, stage_width, 1, groups) for _ in range(count - 1)]
            else:
                stage = [ShuffleV2DownBlock(width, stage_width), *[ShuffleV2Block(stage_width) for _ in range(count)]]
            self.add_module(f"layer{index}", nn.Sequential(*stage))
            width = stage_width
        head: list[nn.Module] = []
        if version == 2:
            head = [nn.Conv2d(width, stages[3], kernel_size=1, bias=False), nn.BatchNorm2d(stages[3]), nn.ReLU()]
            width = stages[3]
        self.pool = nn.Sequential(*head, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x))


def build(arch: str, num_classes: int, image_shape: tuple[int, int, int]) -> ShuffleNetCifar:
    """The network named ``arch`` in ``ARCHITECTURES`` for images of ``image_shape`` (C, H, W)."""
    entry = ARCHITECTURES[arch]
    return ShuffleNetCifar(entry["version"], entry["stages"], entry["blocks"], num_classes, image_shape[0],
                           entry.get("groups", 1))


_STAGE_KEY = re.compile(r"layer[123]\.\d+\.(conv|bn)[1-5]\.\w+")
_TOP_KEY = re.compile(r"(conv1|bn1|conv2|bn2|linear)\.(\w+)")
_TOP_RENAMES = {"conv1": "stem.0", "bn1": "stem.1", "conv2": "pool.0", "bn2": "pool.1", "linear": "fc"}


def _repdistiller_key(key: str) -> str:
    if _STAGE_KEY.fullmatch(key):
        return key
    top = _TOP_KEY.fullmatch(key)
    if top:
        return f"{_TOP_RENAMES[top.group(1)]}.{top.group(2)}"
    raise ValueError(
        f"state key {key!r} is not a RepDistiller ShuffleNet key (conv1, bn1, layer1..3.N, conv2, bn2, linear)"
    )


def import_state(
    arch: str, source: str, state: dict[str, Tensor], image_shape: tuple[int, int, int] = (3, 32, 32)
) -> dict[str, Tensor]:
    """``state`` (a RepDistiller ``ShuffleV1``/``ShuffleV2`` model state dict) under this module's names."""
    return renamed_state(arch, source, state, _repdistiller_key)
