"""CIFAR-style ResNets (He et al. 2016, section 4.2) as the CRD/RepDistiller benchmarks use them.

Three stages of BasicBlocks on a 3x3 stem, no max-pool, so an 8x8 digit and a 32x32 CIFAR image
both keep spatial maps down to the last stage. A block whose width or stride changes gets a 1x1
conv + BN shortcut (option B); this is what makes the parameter counts match the CRD tables
(resnet8x4 1.23M, not the smaller option-A count of the original paper). No ReLU runs in place, so
a tap on any submodule (say ``layer1.0.bn2``) keeps the values that module produced.

Taps: ``stem`` is the stem's post-ReLU output, ``layer1``..``layer3`` the stages' post-ReLU outputs
(RepDistiller's ``models/resnet.py`` f0..f3 with ``preact=False``), ``pool`` the (N, D) penultimate
vector. ``min_image_size`` is the product of the two stride-2 steps. ``import_state(arch,
"repdistiller", state)`` renames RepDistiller's keys (``conv1``, ``bn1``, ``layerS.N.downsample.0/1``).

``ARCHITECTURES`` is a plain literal because the planner reads it with ``ast.literal_eval``
without importing torch: it is the one place that names these architectures and their taps.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from models.repdistiller import initialise, renamed_state

ARCHITECTURES = {
    "resnet20": {"depth": 20, "widths": [16, 16, 32, 64], "taps": ["stem", "layer1", "layer2", "layer3", "pool"],
                  "min_image_size": 4},
    "resnet32": {"depth": 32, "widths": [16, 16, 32, 64], "taps": ["stem", "layer1", "layer2", "layer3", "pool"],
                  "min_image_size": 4},
    "resnet56": {"depth": 56, "widths": [16, 16, 32, 64], "taps": ["stem", "layer1", "layer2", "layer3", "pool"],
                  "min_image_size": 4},
    "resnet110": {"depth": 110, "widths": [16, 16, 32, 64], "taps": ["stem", "layer1", "layer2", "layer3", "pool"],
                  "min_image_size": 4},
    "resnet8x4": {"depth": 8, "widths": [32, 64, 128, 256], "taps": ["stem", "layer1", "layer2", "layer3", "pool"],
                  "min_image_size": 4},
    "resnet32x4": {"depth": 32, "widths": [32, 64, 128, 256], "taps": ["stem", "layer1", "layer2", "layer3", "pool"],
                  "min_image_size": 4},
    # A quarter of resnet8's widths (8, 16, 32, 64), named like resnet8x4: about 5k parameters.
    # Small enough that the bundled 8x8 digits show a real teacher/student capacity gap.
    "resnet8x0.25": {"depth": 8, "widths": [2, 4, 8, 16], "taps": ["stem", "layer1", "layer2", "layer3", "pool"],
                  "min_image_size": 4},
}


def _conv3x3(in_channels: int, out_channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual shortcut; the shortcut projects only when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels, 1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """stem -> layer1 -> layer2 -> layer3 -> pool -> fc; the child names are the tap names.

    ``depth`` is 6n + 2 (n blocks per stage); ``widths`` are the stem width then the three stages'.
    Its generalised layers (``models.taps.generalised_layers``: stem, each block, pool, fc) are also
    worked out from ``depth`` alone by ``pipeline/catalogue.py``'s ``resnet_cifar_layers`` for the
    planner; a change to this module tree changes that function too (tests/test_layers.py checks).
    """

    def __init__(self, depth: int, widths: list[int], num_classes: int, in_channels: int):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        if len(widths) != 4:
            raise ValueError(f"CIFAR ResNet needs 4 widths (stem + 3 stages), got {widths}")
        blocks = (depth - 2) // 6
        self.stem = nn.Sequential(_conv3x3(in_channels, widths[0], 1), nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.layer1 = self._stage(widths[0], widths[1], blocks, stride=1)
        self.layer2 = self._stage(widths[1], widths[2], blocks, stride=2)
        self.layer3 = self._stage(widths[2], widths[3], blocks, stride=2)
        # A module of its own, not a call in forward(), so the penultimate features can be tapped.
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(widths[3], num_classes)
        initialise(self)

    @staticmethod
    def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        first = BasicBlock(in_channels, out_channels, stride)
        rest = [BasicBlock(out_channels, out_channels, 1) for _ in range(blocks - 1)]
        return nn.Sequential(first, *rest)


    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x))


def build(arch: str, num_classes: int, image_shape: tuple[int, int, int]) -> ResNetCifar:
    """The network named ``arch`` in ``ARCHITECTURES`` for images of ``image_shape`` (C, H, W)."""
    entry = ARCHITECTURES[arch]
    return ResNetCifar(entry["depth"], entry["widths"], num_classes, image_shape[0])


_BLOCK_KEY = re.compile(r"(layer[123]\.\d+)\.(conv1|bn1|conv2|bn2|downsample\.0|downsample\.1)\.(\w+)")
_TOP_KEY = re.compile(r"(conv1|bn1|fc)\.(\w+)")
_BLOCK_RENAMES = {"downsample.0": "shortcut.0", "downsample.1": "shortcut.1"}
_TOP_RENAMES = {"conv1": "stem.0", "bn1": "stem.1", "fc": "fc"}


def _repdistiller_key(key: str) -> str:
    block = _BLOCK_KEY.fullmatch(key)
    if block:
        place, module, tensor = block.groups()
        return f"{place}.{_BLOCK_RENAMES.get(module, module)}.{tensor}"
    top = _TOP_KEY.fullmatch(key)
    if top:
        return f"{_TOP_RENAMES[top.group(1)]}.{top.group(2)}"
    raise ValueError(f"state key {key!r} is not a RepDistiller CIFAR ResNet key (conv1, bn1, layer1..3.N, fc)")


def import_state(
    arch: str, source: str, state: dict[str, Tensor], image_shape: tuple[int, int, int] = (3, 32, 32)
) -> dict[str, Tensor]:
    """``state`` (a RepDistiller ``resnet*`` model state dict) under this module's names."""
    return renamed_state(arch, source, state, _repdistiller_key)
