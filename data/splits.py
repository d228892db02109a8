"""A data set as its files give it, and the seeded stratified draws that carve splits from it.

The draws take no numbers from numpy's or torch's generators: each image gets a key hashed from
(seed, index), so a split is a pure function of the seed and the labels and comes out the same on
any machine and with any library version. That is what lets the digits test split stay fixed for
good, and a validation split or a few-data training subset be rebuilt exactly when a job is
requeued elsewhere.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from data.layouts import Files


@dataclass(frozen=True, eq=False)
class RawSplits:
    """The official train and test parts: images (N, C, H, W) in pixel units, labels int64 (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


@dataclass(frozen=True, eq=False)
class StreamedParts:
    """The official parts of a streamed data set as files: paths relative to ``folder`` and labels.

    The ``prepare_data`` stage stores this (the scan of 1.28M files takes minutes on a shared file
    system); ``folder`` is set again from each stage's own ``data_root``, which may differ by node.
    """

    folder: Path
    train_paths: tuple[str, ...]
    train_labels: np.ndarray
    test_paths: tuple[str, ...]
    test_labels: np.ndarray

    @classmethod
    def from_files(cls, folder: Path, train: Files, test: Files) -> "StreamedParts":
        return cls(
            folder=folder,
            train_paths=tuple(path for path, _ in train),
            train_labels=np.fromiter((label for _, label in train), dtype=np.int64, count=len(train)),
            test_paths=tuple(path for path, _ in test),
            test_labels=np.fromiter((label for _, label in test), dtype=np.int64, count=len(test)),
        )

    def at(self, folder: Path) -> "StreamedParts":
        return replace(self, folder=folder)


def _hashed_keys(indices: np.ndarray, salt: str) -> np.ndarray:
    digests = (hashlib.blake2b(f"{salt}:{index}".encode(), digest_size=8).digest() for index in indices)
    return np.fromiter((int.from_bytes(digest, "little") for digest in digests), dtype=np.uint64, count=len(indices))


def _per_class_counts(class_sizes: np.ndarray, fraction: float) -> np.ndarray:
    """How many of each class to draw: ``fraction`` of each, rounded so the total is
    ``round(fraction * N)`` (largest remainders round up, ties to the smaller class label)."""
    exact = class_sizes * fraction
    counts = np.floor(exact).astype(np.int64)
    shortfall = round(fraction * int(class_sizes.sum())) - int(counts.sum())
    counts[np.argsort(counts - exact, kind="stable")[:shortfall]] += 1
    return counts


def _class_sizes(labels: np.ndarray) -> np.ndarray:
    return np.unique(labels, return_counts=True)[1]


def _smallest_keys_per_class(labels: np.ndarray, keys: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """A mask of the ``counts[c]`` images with the smallest keys in each class c (classes in sorted order)."""
    order = np.lexsort((keys, labels))
    classes, starts = np.unique(labels[order], return_index=True)
    class_of = np.searchsorted(classes, labels[order])
    rank_in_class = np.arange(len(labels)) - starts[class_of]
    chosen = np.zeros(len(labels), dtype=bool)
    chosen[order] = rank_in_class < counts[class_of]
    return chosen


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices 0..N-1 into (kept, held_out), both sorted, holding out ``fraction`` of every class.

    Within a class the images with the smallest hashed keys are held out, so a given seed always
    picks the same images and another seed picks others.
    """
    keys = _hashed_keys(np.arange(len(labels)), str(seed))
    held = _smallest_keys_per_class(labels, keys, _per_class_counts(_class_sizes(labels), fraction))
    return np.flatnonzero(~held), np.flatnonzero(held)


def subset_counts(class_sizes: np.ndarray, size: int) -> np.ndarray:
    """How many of each class a subset of ``size`` images takes: each class its share
    ``size * n_c / N``, by largest remainders as in the hold-out; when ``size`` is at least the
    number of classes, a class whose share rounded to none gets one, paid for by the class then
    furthest above its share (ties to the smaller class label), so every class is represented."""
    fraction = size / int(class_sizes.sum())
    exact, counts = class_sizes * fraction, _per_class_counts(class_sizes, fraction)
    if size >= len(class_sizes):
        for empty in np.flatnonzero(counts == 0):
            counts[empty] = 1
            surplus = np.where(counts > 1, counts - exact, -np.inf)
            counts[np.argmax(surplus)] -= 1
    return counts


def stratified_subset(labels: np.ndarray, ids: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted positions into ``labels`` of a ``size``-image subset, ``subset_counts`` of each class.

    ``ids`` name the images (their indices in the official training part) and key the draw, so an
    image's chance does not hang on where it sits among the candidates; the key is salted apart
    from the hold-out's, so the subset is not the images next in line for validation. Within a
    class the smallest keys are taken: for one seed a smaller subset lies inside a larger one
    whenever no class's count shrinks as ``size`` grows (always for equal class sizes).
    """
    counts = subset_counts(_class_sizes(labels), size)
    return np.flatnonzero(_smallest_keys_per_class(labels, _hashed_keys(ids, f"subset-{seed}"), counts))
