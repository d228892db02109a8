"""Loading a data set by name with train, validation and test splits: in-memory uint8 tensors, or
for full ImageNet, files streamed batch by batch (``data/streaming.py``).

A data set lives in a module of this package holding ``DATASETS`` (a literal the planner reads
without importing torch), ``AUGMENT`` (its batched training augmentation) and
``read(name, root) -> RawSplits``; adding one is a new module and one entry in ``_MODULES``. The
validation split is carved here, the same way for every data set, from the official training part
only, so that choosing on validation never looks at a test image. A few-data training subset
(``subset_size``, as comparative KD trains its students) is drawn after that, from the training
split alone, so the validation split is the same with and without it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from data import cifar, digits, imagefolder
from data.imagefolder import CropFlipBySize
from data.augment import RandomCropFlip, normalise
from data.errors import DatasetError
from data.files import NO_DATA_ROOT, fingerprint
from data.layouts import folder_facts
from data.splits import RawSplits, StreamedParts, stratified_holdout, stratified_subset
from data.streaming import StreamedSplits

DATA_ROOT_ENV = "KDBENCH_DATA"

_MODULES: tuple[ModuleType, ...] = (digits, cifar, imagefolder)
_MODULE_OF = {name: module for module in _MODULES for name in module.DATASETS}


@dataclass(frozen=True, eq=False)
class DatasetSplits:
    """A data set ready for training: images uint8 (N, C, H, W) as the files hold them, labels int64.

    Images stay uint8 in memory (a quarter of float32's bytes: CIFAR-100's training split is 150 MB)
    and are turned into float32 one batch at a time by ``normalise``, with the training split's
    per-channel mean and std (``channel_mean``/``channel_std``, in pixel units). With a
    ``subset_size`` the training tensors hold only the subset, but the statistics stay the whole
    training split's: the teacher, trained on all of it, then sees its inputs normalised as in its
    own training, and the validation and test tensors do not change with the subset.

    ``augment`` is the data set's training augmentation for batches of uint8 images, applied
    before ``normalise``. The validation tensors are empty when ``val_fraction`` is 0.

    ``resident_on(device)`` moves the images and the training labels to a GPU for good: then an
    epoch's order and augmentation draws are made on the host and copied there once, and every
    batch is picked, cropped, flipped and normalised by tensor operations on the GPU, with no
    copy per step (``epoch_images``). The validation and test labels stay on the host, where
    ``predict`` hands its logits.
    """

    train_images: Tensor
    train_labels: Tensor
    val_images: Tensor
    val_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    num_classes: int
    image_shape: tuple[int, int, int]
    channel_mean: tuple[float, ...]
    channel_std: tuple[float, ...]
    augment: RandomCropFlip

    @property
    def device(self) -> torch.device:
        """Where the images are: the CPU, or the GPU they are resident on."""
        return self.train_images.device

    @property
    def image_bytes(self) -> int:
        return sum(images.numel() for images in (self.train_images, self.val_images, self.test_images))

    def resident_on(self, device: torch.device) -> "DatasetSplits":
        """These splits with their images and training labels on ``device``."""
        return replace(
            self, train_images=self.train_images.to(device), train_labels=self.train_labels.to(device),
            val_images=self.val_images.to(device), test_images=self.test_images.to(device),
        )

    def normalise(self, images: Tensor) -> Tensor:
        """A batch of uint8 images as float32, per channel ``(x - mean) / std``, on the batch's device."""
        return normalise(images, self.channel_mean, self.channel_std)

    def epoch_images(self, order: Tensor, batch_size: int, generator: torch.Generator | None) -> Iterator[Tensor]:
        """uint8 training batches of the images at ``order``, each batch augmented with draws from
        ``generator`` in turn (None: unaugmented), on the images' device. The whole epoch's draws
        are taken from ``generator`` before the first batch, in the order batch-by-batch drawing
        takes them, and go to the device with ``order`` in one copy each."""
        starts = range(0, len(order), batch_size)
        draws = None
        if generator is not None:
            draws = self.augment.draw_epoch((min(batch_size, len(order) - start) for start in starts), generator)
            draws = draws.to(self.device)
        order = order.to(self.device)
        for start in starts:
            # index_select: one contiguous copy per image, 6x faster than advanced indexing on uint8
            images = self.train_images.index_select(0, order[start : start + batch_size])
            yield images if draws is None else self.augment.apply(images, draws[start : start + batch_size])

    def split_images(self, split: str, batch_size: int) -> Iterator[Tensor]:
        """Every uint8 image of ``split`` ("train", "val" or "test"), unaugmented, in order, batch by batch."""
        images = {"train": self.train_images, "val": self.val_images, "test": self.test_images}[split]
        for start in range(0, len(images), batch_size):
            yield images[start : start + batch_size]


Splits = DatasetSplits | StreamedSplits
"""What a stage trains and evaluates on: in memory, or (full ImageNet) streamed from its files. Both
give ``{train,val,test}_labels``, ``num_classes``, ``image_shape``, ``normalise``, ``epoch_images``
and ``split_images``."""


def dataset_names() -> list[str]:
    return sorted(_MODULE_OF)


def _module(name: str) -> ModuleType:
    if name not in _MODULE_OF:
        raise KeyError(f"unknown data set {name!r}; allowed: {', '.join(dataset_names())}")
    return _MODULE_OF[name]


def read_official_parts(name: str, root: str | None, expected_fingerprint: str | None = None) -> RawSplits | StreamedParts:
    """The official training and test parts of ``name`` as its files under ``root`` (None: env
    ``KDBENCH_DATA``) hold them, uint8, or for a data set too large for memory, its files to stream.

    With ``expected_fingerprint`` (what the plan hashed), files that fingerprint otherwise are
    refused before they are read: a stage must not write results for other data into a folder
    named after this data.
    """
    module = _module(name)
    root = root or os.environ.get(DATA_ROOT_ENV) or None
    if expected_fingerprint is not None:
        check_fingerprint(name, root, expected_fingerprint)
    return module.read(name, root)


def load_dataset(
    name: str,
    root: str | None,
    val_fraction: float,
    split_seed: int,
    expected_fingerprint: str | None = None,
    subset_size: int | None = None,
    official_parts: RawSplits | StreamedParts | None = None,
) -> Splits:
    """``name``'s official parts (``read_official_parts``) with a seeded, stratified ``val_fraction``
    of the training part held out for validation; with ``subset_size``, training on a seeded,
    stratified subset of that many images of the rest (``data/splits.py``, same ``split_seed``).

    ``official_parts`` are the parts a ``prepare_data`` stage decoded (or listed, for a streamed
    set): its hash is the data set's fingerprint, checked when it decoded, so they are not read,
    nor fingerprinted, again.
    """
    module = _module(name)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    root = root or os.environ.get(DATA_ROOT_ENV) or None
    raw = read_official_parts(name, root, expected_fingerprint) if official_parts is None else official_parts
    if isinstance(raw, StreamedParts) and root is not None:  # the files where this node mounts them
        raw = raw.at(Path(root))
    return _split(
        name, raw, module.DATASETS[name]["num_classes"] or folder_facts(name, root)[0], val_fraction, split_seed, subset_size, module.AUGMENT,
    )


def check_fingerprint(name: str, root: str | None, expected: str) -> None:
    """Raises DatasetError unless the files under ``root`` are the ones the plan fingerprinted."""
    if expected == NO_DATA_ROOT:
        raise DatasetError(
            f"data set {name} was planned without a data_root, so its stages' hashes name no data; set the sweep "
            "key 'data_root' (or env KDBENCH_DATA) and plan the sweep again"
        )
    found = fingerprint(name, root)
    if found != expected:
        raise DatasetError(
            f"data set {name} under {root}: its files have fingerprint {found[:12]}, but the plan hashed "
            f"{expected[:12]}: the files changed since planning, or data_root now points elsewhere; plan the sweep again"
        )


def _training_subset(name: str, labels: np.ndarray, train: np.ndarray, subset_size: int, seed: int) -> np.ndarray:
    """Positions into ``train`` (indices into the official training part) of the ``subset_size`` images to keep."""
    if isinstance(subset_size, bool) or not isinstance(subset_size, int) or not 1 <= subset_size <= len(train):
        raise DatasetError(
            f"data.subset_size {subset_size!r} does not fit data set {name}'s training split of {len(train)} images "
            f"(after the validation hold-out); allowed: an int from 1 to {len(train)}, or null for all of it"
        )
    return stratified_subset(labels[train], train, subset_size, seed)


def _split(
    name: str,
    raw: RawSplits | StreamedParts,
    num_classes: int,
    val_fraction: float,
    split_seed: int,
    subset_size: int | None,
    augment: RandomCropFlip | CropFlipBySize,
) -> Splits:
    train, val = stratified_holdout(raw.train_labels, val_fraction, split_seed)
    streamed = isinstance(raw, StreamedParts)
    if not streamed:  # before the subset: the statistics are the whole training split's
        mean, std = _channel_statistics(raw.train_images, train)
    if subset_size is not None:
        train = train[_training_subset(name, raw.train_labels, train, subset_size, split_seed)]
    if streamed:
        image_shape = tuple(_module(name).DATASETS[name]["image_shape"])
        return StreamedSplits(raw, train, val, num_classes, image_shape, workers=torch.get_num_threads())

    def images(values: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.uint8))

    def labels(values: np.ndarray) -> Tensor:
        return torch.tensor(values, dtype=torch.int64)

    return DatasetSplits(
        train_images=images(raw.train_images[train]),
        train_labels=labels(raw.train_labels[train]),
        val_images=images(raw.train_images[val]),
        val_labels=labels(raw.train_labels[val]),
        test_images=images(raw.test_images),
        test_labels=labels(raw.test_labels),
        num_classes=num_classes,
        image_shape=tuple(raw.train_images.shape[1:]),
        channel_mean=mean,
        channel_std=std,
        augment=augment.for_width(raw.train_images.shape[-1]),
    )


_STATISTICS_CHUNK = 1024
"""Images per float64 chunk of the channel statistics: bounded memory whatever the split's size (25 MB
at CIFAR's size, twice that with the squares). The sums are of integers, exact in float64 below
2**53, so the chunk size does not change a bit of the result."""


def _channel_statistics(images: np.ndarray, rows: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of ``images[rows]`` in pixel units, summed in float64
    chunk by chunk, so that a 100,000-image split never exists as floats all at once."""
    total = np.zeros(images.shape[1])
    squares = np.zeros(images.shape[1])
    for start in range(0, len(rows), _STATISTICS_CHUNK):
        chunk = images[np.sort(rows[start : start + _STATISTICS_CHUNK])].astype(np.float64)
        total += chunk.sum(axis=(0, 2, 3))
        squares += np.square(chunk).sum(axis=(0, 2, 3))
    count = max(len(rows), 1) * images.shape[2] * images.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - np.square(mean), 0.0))
    # A channel without spread (flat synthetic images) is only centred: dividing by 0 would give NaN.
    std = np.where(std > 0.0, std, 1.0)
    return tuple(mean.tolist()), tuple(std.tolist())
