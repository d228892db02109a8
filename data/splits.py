"""A data set as its files give it, and the seeded stratified hold-out that carves splits from it.

The hold-out draws no numbers from numpy's or torch's generators: each image gets a key hashed
from (seed, index), so a split is a pure function of the seed and the labels and comes out the
same on any machine and with any library version. That is what lets the digits test split stay
fixed for good and a validation split be rebuilt exactly when a job is requeued elsewhere.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class RawSplits:
    """The official train and test parts: images (N, C, H, W) in pixel units, labels int64 (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def _hashed_keys(count: int, seed: int) -> np.ndarray:
    digests = (hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest() for index in range(count))
    return np.fromiter((int.from_bytes(digest, "little") for digest in digests), dtype=np.uint64, count=count)


def _per_class_counts(class_sizes: np.ndarray, fraction: float) -> np.ndarray:
    """How many of each class to hold out: ``fraction`` of each, rounded so the total is
    ``round(fraction * N)`` (largest remainders round up, ties to the smaller class label)."""
    exact = class_sizes * fraction
    counts = np.floor(exact).astype(np.int64)
    shortfall = round(fraction * int(class_sizes.sum())) - int(counts.sum())
    counts[np.argsort(counts - exact, kind="stable")[:shortfall]] += 1
    return counts


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices 0..N-1 into (kept, held_out), both sorted, holding out ``fraction`` of every class.

    Within a class the images with the smallest hashed keys are held out, so a given seed always
    picks the same images and another seed picks others.
    """
    order = np.lexsort((_hashed_keys(len(labels), seed), labels))
    classes, starts, sizes = np.unique(labels[order], return_index=True, return_counts=True)
    class_of = np.searchsorted(classes, labels[order])
    rank_in_class = np.arange(len(labels)) - starts[class_of]
    held = rank_in_class < _per_class_counts(sizes, fraction)[class_of]
    return np.sort(order[~held]), np.sort(order[held])
