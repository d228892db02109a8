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

import functools
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class RandomCropFlip:
    """Zero-pad by ``pad`` pixels and crop back to the input size at a random offset; with ``flip``,
    also mirror each image left-right with probability 1/2.

    The random part (``draw``) is apart from the pixel work (``apply``), so a data set resident on
    a GPU draws a whole epoch's offsets on the host, from the epoch's CPU generator, in the order
    batch-by-batch augmentation draws them, and copies them to the GPU once: the GPU run sees the
    images a CPU run sees, and no step waits on a host-to-device copy.
    """

    pad: int
    flip: bool

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Augment a batch (N, C, H, W); the output has the input's shape, dtype and device."""
        return self.apply(images, self.draw(len(images), generator))

    def for_width(self, width: int) -> "RandomCropFlip":
        """The augmentation of images ``width`` pixels wide: this one, whatever the width."""
        return self

    def draw(self, count: int, generator: torch.Generator) -> Tensor:
        """A batch's random draws as int64 (count, 3): each image's crop top, crop left, and 1 where
        it is mirrored."""
        offsets = torch.randint(2 * self.pad + 1, (2, count, 1), generator=generator, device=generator.device)
        mirrored = torch.zeros(count, 1, dtype=torch.int64, device=generator.device)
        if self.flip:
            mirrored = (torch.rand(count, 1, generator=generator, device=generator.device) < 0.5).long()
        return torch.cat([offsets[0], offsets[1], mirrored], dim=1)

    def draw_epoch(self, batch_sizes: Iterable[int], generator: torch.Generator) -> Tensor:
        """``draw`` for each batch in turn, stacked (sum of the sizes, 3): the same numbers that
        augmenting batch after batch with ``generator`` draws."""
        draws = [self.draw(count, generator) for count in batch_sizes]
        return torch.cat(draws) if draws else torch.empty(0, 3, dtype=torch.int64)

    def apply(self, images: Tensor, draws: Tensor) -> Tensor:
        """The batch cropped and mirrored as ``draws`` (``draw``'s rows, one per image) say."""
        count, channels, height, width = images.shape
        draws = draws.to(images.device)
        top, left, mirrored = draws[:, 0:1], draws[:, 1:2], draws[:, 2:3].bool()
        rows = top + torch.arange(height, device=images.device)
        columns = left + torch.arange(width, device=images.device)
        columns = torch.where(mirrored, columns.flip(1), columns)
        padded = F.pad(images, (self.pad, self.pad, self.pad, self.pad)).flatten(2)
        pixels = (rows[:, :, None] * (width + 2 * self.pad) + columns[:, None, :]).view(count, 1, height * width)
        return padded.gather(2, pixels.expand(-1, channels, -1)).view(count, channels, height, width)


def normalise(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """A batch of uint8 images as float32, per channel ``(x - mean) / std`` (pixel units), on the
    batch's device: done per batch, after the uint8 batch reached that device."""
    mean_tensor, std_tensor = _channel_tensors(mean, std, images.device)
    return images.float().sub_(mean_tensor).div_(std_tensor)


@functools.lru_cache(maxsize=64)
def _channel_tensors(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """The statistics as (C, 1, 1) tensors on ``device``, made once: building them per batch
    copied them host-to-device every step, and on a GPU each such copy waits for the queue."""
    return torch.tensor(mean, device=device)[:, None, None], torch.tensor(std, device=device)[:, None, None]
