"""Full ImageNet streamed from its JPEG files through a DataLoader, with the in-memory path's contract.

ImageNet's 1.28M training images do not fit in memory as uint8 (190 GB at 224 px), so they are
decoded on the fly by DataLoader worker processes. What the training loop sees is the same as
for the in-memory data sets (``data.registry.DatasetSplits``): uint8 batches in the epoch order
the loop draws, normalised per batch, split into train / validation / test the same stratified
way. Augmentation is the ImageNet recipe torchvision's reference scripts use, per image: a
random resized crop to 224 (scale 0.08-1, ratio 3/4-4/3, as ``RandomResizedCrop``) and a
horizontal flip; evaluation images are scaled so their shorter side is 224 / 0.875 = 256 and
centre-cropped to 224. The resizing is torchvision's (antialiased, on uint8 tensors).

Resume-exactness does not depend on the workers: every image's crop and flip come from its own
seed, a pure function of (the epoch's generator, the image's index), so which worker decodes it,
the batch size, and whether the epoch is the first run or a requeued one make no difference.

The per-channel statistics are ImageNet's published training-set mean and std (torchvision's
``ImageNet1K`` weights use them): computing them over 1.28M streamed images would cost an epoch
of decoding, and this is the training split they were measured on.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from data.augment import normalise
from data.imagefolder import decode_file
from data.splits import StreamedParts

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
EVAL_CROP_FRACTION = 0.875
"""The centre crop's share of the resized side at evaluation: 224 of 256, as torchvision's ImageNet weights."""


def random_resized_crop_box(height: int, width: int, rng: random.Random) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width) of an Inception-style random crop (Szegedy et al. 2015,
    as torchvision's ``RandomResizedCrop`` defines it): an area of ``CROP_SCALE`` of the image's
    and an aspect ratio log-uniform in ``CROP_RATIO``, at a uniform position; after ten draws that
    do not fit, the centred largest crop whose aspect lies in that range.

    Drawn from ``rng`` rather than torch's global generator: seeding that per image costs more
    than the crop itself, and must not touch the caller's stream.
    """
    area, (low, high) = height * width, (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        aspect = math.exp(rng.uniform(low, high))
        crop_width, crop_height = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            return rng.randint(0, height - crop_height), rng.randint(0, width - crop_width), crop_height, crop_width
    crop_height, crop_width = height, width
    if width / height < CROP_RATIO[0]:
        crop_height = round(width / CROP_RATIO[0])
    elif width / height > CROP_RATIO[1]:
        crop_width = round(height * CROP_RATIO[1])
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


class _ImageFiles(Dataset):
    """Item ``(position, seed)``: the image at ``position`` of ``paths``, uint8 (3, size, size).

    ``seed`` None gives the evaluation view (shorter side to size / ``EVAL_CROP_FRACTION``, centre
    crop); otherwise the training view, a random resized crop flipped with probability 1/2, drawn
    from ``random.Random(seed)``.
    """

    def __init__(self, folder: Path, paths: tuple[str, ...], size: int) -> None:
        self.folder, self.paths, self.size = folder, paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int | None]) -> Tensor:
        from torchvision.transforms.v2 import functional as F  # imported when used, as in data/imagefolder.py

        position, seed = item
        image = decode_file(self.folder / self.paths[position])
        if seed is None:
            resized = F.resize(image, round(self.size / EVAL_CROP_FRACTION), antialias=True)
            return F.center_crop(resized, [self.size, self.size])
        rng = random.Random(seed)
        top, left, height, width = random_resized_crop_box(*image.shape[-2:], rng)
        view = F.resized_crop(image, top, left, height, width, [self.size, self.size], antialias=True)
        return F.horizontal_flip(view) if rng.random() < 0.5 else view


def _single_threaded_worker(_: int) -> None:
    """Each worker decodes one image at a time: torch threads inside every worker would oversubscribe the cores."""
    torch.set_num_threads(1)


def _image_batches(dataset: _ImageFiles, batches: list[list[tuple[int, int | None]]], workers: int) -> Iterator[Tensor]:
    return iter(DataLoader(
        dataset, batch_sampler=batches, num_workers=workers,
        worker_init_fn=_single_threaded_worker if workers else None,
        # its own generator: the loader draws its workers' base seed, which must not come from (and
        # shift) the caller's stream; the images' draws do not use it
        generator=torch.Generator(),
    ))


@dataclass(frozen=True, eq=False)
class StreamedSplits:
    """A streamed data set ready for training, with ``DatasetSplits``'s batch interface.

    ``train_rows`` / ``val_rows`` are positions into the official training part (the stratified
    hold-out and subset, as for in-memory data). ``workers`` DataLoader processes decode: the
    stage's CPU share (``torch.get_num_threads()`` when the splits are made), since decoding, not the
    loop, is what bounds a streamed epoch. The label tensors are made once (cached): the loop
    indexes them every batch.
    """

    parts: StreamedParts
    train_rows: np.ndarray
    val_rows: np.ndarray
    num_classes: int
    image_shape: tuple[int, int, int]
    workers: int
    channel_mean: tuple[float, ...] = IMAGENET_MEAN
    channel_std: tuple[float, ...] = IMAGENET_STD

    @cached_property
    def train_labels(self) -> Tensor:
        return torch.from_numpy(self.parts.train_labels[self.train_rows])

    @cached_property
    def val_labels(self) -> Tensor:
        return torch.from_numpy(self.parts.train_labels[self.val_rows])

    @cached_property
    def test_labels(self) -> Tensor:
        return torch.from_numpy(self.parts.test_labels)

    def normalise(self, images: Tensor) -> Tensor:
        return normalise(images, self.channel_mean, self.channel_std)

    def _train_files(self) -> _ImageFiles:
        return _ImageFiles(self.parts.folder, self.parts.train_paths, self.image_shape[-1])

    def epoch_images(self, order: Tensor, batch_size: int, generator: torch.Generator | None) -> Iterator[Tensor]:
        """uint8 training batches of the images at ``order`` (positions into the training split), with
        each image's own crop and flip seeded from one number drawn from ``generator`` (None: unaugmented)."""
        base = None if generator is None else int(torch.randint(2**62, (1,), generator=generator))
        rows = self.train_rows[order.numpy()]
        batches = [
            [(int(row), None if base is None else _image_seed(base, int(position)))
             for row, position in zip(rows[start : start + batch_size], order[start : start + batch_size].tolist())]
            for start in range(0, len(order), batch_size)
        ]
        return _image_batches(self._train_files(), batches, self.workers)

    def split_images(self, split: str, batch_size: int) -> Iterator[Tensor]:
        """The evaluation view of every image of ``split`` ("train", "val" or "test"), in order."""
        if split == "test":
            dataset = _ImageFiles(self.parts.folder, self.parts.test_paths, self.image_shape[-1])
            rows = np.arange(len(self.parts.test_paths))
        else:
            dataset, rows = self._train_files(), self.train_rows if split == "train" else self.val_rows
        batches = [[(int(row), None) for row in rows[start : start + batch_size]] for start in range(0, len(rows), batch_size)]
        return _image_batches(dataset, batches, self.workers)


def _image_seed(base: int, position: int) -> int:
    """The seed of one training image's crop and flip in one epoch: distinct per position within the epoch."""
    return (base * 1_000_003 + position) % 2**63
