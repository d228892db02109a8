"""scikit-learn's handwritten digits: 1,797 real 8x8 grey images that ship inside the sklearn wheel.

They give a real data set that needs no download, so a sweep runs end to end on a laptop or in CI.
Pixels are 4-bit grey levels 0..16. The set has no official test split, so ours is a stratified
20% held out with ``TEST_SPLIT_SEED`` before any validation split is carved: every run, whatever
its ``split_seed``, is tested on the same 359 images.
"""
from __future__ import annotations

import numpy as np

from data.augment import RandomCropFlip
from data.splits import RawSplits, stratified_holdout

DATASETS = {
    "digits": {
        "num_classes": 10,
        "image_shape": [1, 8, 8],
        "needs_root": False,
        "summary": "scikit-learn's 1,797 real 8x8 handwritten digits, bundled; fixed 20% stratified test split",
    },
}

TEST_FRACTION = 0.2

TEST_SPLIT_SEED = 0
"""Never change it: a new value moves images between train and test and makes old results incomparable."""

AUGMENT = RandomCropFlip(pad=1, flip=False)
"""Shift by up to one pixel and never mirror: a mirrored 2, 3 or 7 is not a digit."""


def read(name: str, root: str | None) -> RawSplits:
    """The digits with the fixed test split; ``name`` and ``root`` go unused (one data set, bundled)."""
    # Imported here: sklearn.datasets takes seconds to import, which CIFAR jobs should not pay.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32)[:, None]
    labels = bunch.target.astype(np.int64)
    train, test = stratified_holdout(labels, TEST_FRACTION, TEST_SPLIT_SEED)
    return RawSplits(images[train], labels[train], images[test], labels[test])
