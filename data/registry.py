"""Loading a data set by name as normalised in-memory tensors with train, validation and test splits.

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
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from data import cifar, digits, imagefolder
from data.errors import DatasetError
from data.files import NO_DATA_ROOT, fingerprint
from data.layouts import folder_facts
from data.splits import RawSplits, stratified_holdout, stratified_subset

DATA_ROOT_ENV = "KDBENCH_DATA"

_MODULES: tuple[ModuleType, ...] = (digits, cifar, imagefolder)
_MODULE_OF = {name: module for module in _MODULES for name in module.DATASETS}


@dataclass(frozen=True, eq=False)
class DatasetSplits:
    """A data set ready for training: images float32 (N, C, H, W) normalised per channel with the
    training split's mean and std (kept in ``channel_mean``/``channel_std`` to undo it), labels int64.
    With a ``subset_size`` the training tensors hold only the subset, but the statistics stay the
    whole training split's: the teacher, trained on all of it, then sees its inputs normalised as
    in its own training, and the validation and test tensors do not change with the subset.

    ``augment(images, generator)`` is the data set's training augmentation for a batch of these
    images. The validation tensors are empty when ``val_fraction`` is 0.
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
    augment: Callable[[Tensor, torch.Generator], Tensor]


def dataset_names() -> list[str]:
    return sorted(_MODULE_OF)


def load_dataset(
    name: str,
    root: str | None,
    val_fraction: float,
    split_seed: int,
    expected_fingerprint: str | None = None,
    subset_size: int | None = None,
) -> DatasetSplits:
    """Read ``name`` from ``root`` (None: env ``KDBENCH_DATA``) and hold out a seeded, stratified
    ``val_fraction`` of its training part for validation; with ``subset_size``, train on a seeded,
    stratified subset of that many images of the rest (``data/splits.py``, same ``split_seed``).

    With ``expected_fingerprint`` (what the plan hashed), files that fingerprint otherwise are
    refused before they are read: a stage must not write results for other data into a folder
    named after this data.
    """
    module = _MODULE_OF.get(name)
    if module is None:
        raise KeyError(f"unknown data set {name!r}; allowed: {', '.join(dataset_names())}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    root = root or os.environ.get(DATA_ROOT_ENV) or None
    if expected_fingerprint is not None:
        check_fingerprint(name, root, expected_fingerprint)
    raw = module.read(name, root)
    return _split_and_normalise(
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


def _split_and_normalise(
    name: str,
    raw: RawSplits,
    num_classes: int,
    val_fraction: float,
    split_seed: int,
    subset_size: int | None,
    augment: Callable[[Tensor, torch.Generator], Tensor],
) -> DatasetSplits:
    train, val = stratified_holdout(raw.train_labels, val_fraction, split_seed)
    train_images = torch.tensor(raw.train_images[train], dtype=torch.float32)
    variance, mean = torch.var_mean(train_images, dim=(0, 2, 3), correction=0)
    std = variance.sqrt()
    if subset_size is not None:
        kept = _training_subset(name, raw.train_labels, train, subset_size, split_seed)
        train, train_images = train[kept], train_images[torch.from_numpy(kept)]

    def normalised(images: Tensor) -> Tensor:
        return images.sub_(mean[:, None, None]).div_(std[:, None, None])

    def labels(values: np.ndarray) -> Tensor:
        return torch.tensor(values, dtype=torch.int64)

    return DatasetSplits(
        train_images=normalised(train_images),
        train_labels=labels(raw.train_labels[train]),
        val_images=normalised(torch.tensor(raw.train_images[val], dtype=torch.float32)),
        val_labels=labels(raw.train_labels[val]),
        test_images=normalised(torch.tensor(raw.test_images, dtype=torch.float32)),
        test_labels=labels(raw.test_labels),
        num_classes=num_classes,
        image_shape=tuple(raw.train_images.shape[1:]),
        channel_mean=tuple(mean.tolist()),
        channel_std=tuple(std.tolist()),
        augment=augment,
    )
