"""Batched training augmentation on in-memory image tensors (a random crop and flip per image), and
the per-batch normalisation every data path shares.

A whole batch is cropped with one gather (pad once, then pick each image's pixels by flat index
from its own row and column offsets), so the cost is a few tensor operations whatever the batch
size, with no Python loop over images. Every random number comes from the generator passed in,
so an epoch's augmentation is replayed exactly from its seed after a requeue. Images arrive as
uint8, before normalisation, so the zero padding is black, as in torchvision's ``RandomCrop(padding=4)``
on the PIL image in RepDistiller's CIFAR pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class RandomCropFlip:
    """Zero-pad by ``pad`` pixels and crop back to the input size at a random offset; with ``flip``,
    also mirror each image left-right with probability 1/2."""

    pad: int
    flip: bool

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Augment a batch (N, C, H, W); the output has the input's shape, dtype and device."""
        count, channels, height, width = images.shape
        offsets = torch.randint(2 * self.pad + 1, (2, count, 1), generator=generator, device=generator.device)
        top, left = offsets.to(images.device)
        rows = top + torch.arange(height, device=images.device)
        columns = left + torch.arange(width, device=images.device)
        if self.flip:
            mirrored = torch.rand(count, 1, generator=generator, device=generator.device) < 0.5
            columns = torch.where(mirrored.to(images.device), columns.flip(1), columns)
        padded = F.pad(images, (self.pad, self.pad, self.pad, self.pad)).flatten(2)
        pixels = (rows[:, :, None] * (width + 2 * self.pad) + columns[:, None, :]).view(count, 1, height * width)
        return padded.gather(2, pixels.expand(-1, channels, -1)).view(count, channels, height, width)


def normalise(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """A batch of uint8 images as float32, per channel ``(x - mean) / std`` (pixel units), on the
    batch's device: done per batch, after the uint8 batch reached that device."""
    mean_tensor = torch.tensor(mean, device=images.device)[:, None, None]
    std_tensor = torch.tensor(std, device=images.device)[:, None, None]
    return images.float().sub_(mean_tensor).div_(std_tensor)
