"""CIFAR VGGs with batch norm and a single linear classifier, as CRD/RepDistiller train them.

The reference is RepDistiller's ``models/vgg.py`` (``vgg8_bn``, ``vgg13_bn``, which its model table
calls ``vgg8`` and ``vgg13``; Simonyan & Zisserman 2015 for the VGG design): five blocks of
3x3 conv (with bias) + BN + ReLU, 2x2 max-pools between the first four, then global average pooling
and one Linear. RepDistiller's fourth max-pool runs only on 64-pixel inputs (Tiny-ImageNet); here
``build`` includes it when the image height is 64 or more, and an ``nn.Identity`` holds its place
otherwise so the parameter names do not move.

Module names: ``stem`` is block 0 with its ReLU; ``layer1``..``layer4`` are each the max-pool before
a block, the block and its ReLU. Every stage output is therefore RepDistiller's post-ReLU feature for
that block (f0..f4, the ``preact=False`` features), ``pool`` the (N, 512) pooled vector (f5) and
``fc`` the logits. ``min_image_size`` is the product of the strides before the last stage: three
max-pools leave the last stages one pixel on an 8x8 input, and a fourth would fail.
``import_state(arch, "repdistiller", state)`` renames ``block{i}.{j}.*`` and ``classifier.*``.
"""
from __future__ import annotations

import re

from torch import Tensor, nn

from models.repdistiller import initialise, renamed_state

ARCHITECTURES = {
    "vgg8": {"blocks": [[64], [128], [256], [512], [512]], "min_image_size": 8,
             "taps": ["stem", "layer1", "layer2", "layer3", "layer4", "pool", "fc"]},
    "vgg13": {"blocks": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]], "min_image_size": 8,
              "taps": ["stem", "layer1", "layer2", "layer3", "layer4", "pool", "fc"]},
}

_LAST_POOL_FROM = 64
"""Input height from which the max-pool before the last block runs (RepDistiller: height == 64)."""


def _convs(in_channels: int, widths: list[int]) -> list[nn.Module]:
    """Conv-BN-ReLU for each width: the reference's ``_make_layers`` with its final ReLU kept as a module."""
    modules: list[nn.Module] = []
    for width in widths:
        modules += [nn.Conv2d(in_channels, width, kernel_size=3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        in_channels = width
    return modules


class VGGCifar(nn.Module):
    """stem -> layer1 .. layer4 -> pool -> fc; the child names are the tap names."""

    def __init__(self, blocks: list[list[int]], num_classes: int, in_channels: int, last_pool: bool):
        super().__init__()
        if len(blocks) != 5:
            raise ValueError(f"CIFAR VGG needs 5 blocks of widths, got {blocks}")
        self.stem = nn.Sequential(*_convs(in_channels, blocks[0]))
        for stage in range(1, 5):
            pool = nn.MaxPool2d(kernel_size=2, stride=2) if stage < 4 or last_pool else nn.Identity()
            self.add_module(f"layer{stage}", nn.Sequential(pool, *_convs(blocks[stage - 1][-1], blocks[stage])))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(blocks[4][-1], num_classes)
        initialise(self, classifier_std=0.01, zero_classifier_bias=True)


    def forward(self, x: Tensor) -> Tensor:
        for stage in (self.stem, self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
        return self.fc(self.pool(x))


def build(arch: str, num_classes: int, image_shape: tuple[int, int, int]) -> VGGCifar:
    """The network named ``arch`` in ``ARCHITECTURES`` for images of ``image_shape`` (C, H, W)."""
    return VGGCifar(ARCHITECTURES[arch]["blocks"], num_classes, image_shape[0], image_shape[1] >= _LAST_POOL_FROM)


_BLOCK_KEY = re.compile(r"block([0-4])\.(\d+)\.(\w+)")
_CLASSIFIER_KEY = re.compile(r"classifier\.(weight|bias)")


def _repdistiller_key(key: str) -> str:
    block = _BLOCK_KEY.fullmatch(key)
    if block:
        stage, index, tensor = int(block.group(1)), int(block.group(2)), block.group(3)
        # Each stage but the stem starts with its max-pool, one place ahead of the reference's block.
        return f"stem.{index}.{tensor}" if stage == 0 else f"layer{stage}.{index + 1}.{tensor}"
    classifier = _CLASSIFIER_KEY.fullmatch(key)
    if classifier:
        return f"fc.{classifier.group(1)}"
    raise ValueError(f"state key {key!r} is not a RepDistiller VGG key (block0..4.N, classifier)")


def import_state(
    arch: str, source: str, state: dict[str, Tensor], image_shape: tuple[int, int, int] = (3, 32, 32)
) -> dict[str, Tensor]:
    """``state`` (a RepDistiller ``vgg*_bn`` model state dict) under this module's names."""
    return renamed_state(arch, source, state, _repdistiller_key)
