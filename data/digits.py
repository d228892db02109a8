"""scikit-learn's handwritten digits: 1,797 real 8x8 grey images that ship inside the sklearn wheel.

They give a real data set that needs no download, so a sweep runs end to end on a laptop or in CI.
Pixels are 4-bit grey levels 0..16. The set has no official test split, so ours is a stratified
20% held out with ``TEST_SPLIT_SEED`` before any validation split is carved: every run, whatever
its ``split_seed``, is tested on the same 359 images.
"""
from __future__ import annotations

import gzip

import numpy as np

from data.augment import RandomCropFlip
from data.errors import DatasetCorruptError, one_line
from data.files import digits_file
from data.splits import RawSplits, stratified_holdout

DATASETS = {
    "digits": {
        "num_classes": 10,
        "image_shape": [1, 8, 8],
        "needs_root": False,
        "train_images": 1438,
        "summary": "scikit-learn's 1,797 real 8x8 handwritten digits, bundled; fixed 20% stratified test split",
    },
}

TEST_FRACTION = 0.2

TEST_SPLIT_SEED = 0
"""Never change it: a new value moves images between train and test and makes old results incomparable."""

AUGMENT = RandomCropFlip(pad=1, flip=False)
"""Shift by up to one pixel and never mirror: a mirrored 2, 3 or 7 is not a digit."""


def read(name: str, root: str | None) -> RawSplits:
    """The digits with the fixed test split; ``name`` and ``root`` go unused (one data set, bundled).

    Reads scikit-learn's file the way ``sklearn.datasets.load_digits`` does (64 grey levels, then
    the label, per row) without importing sklearn, which takes seconds; ``data/files.py`` finds the
    file, for this reader and for the planner's fingerprint alike.
    """
    path = digits_file()
    try:
        with gzip.open(path, "rt") as text:
            rows = np.loadtxt(text, delimiter=",")
    except (OSError, EOFError, ValueError) as error:
        raise DatasetCorruptError(f"{path} cannot be read ({one_line(error)}); reinstall scikit-learn") from error
    if rows.ndim != 2 or rows.shape[1] != 65:
        raise DatasetCorruptError(
            f"{path} is not scikit-learn's digits file (rows of 64 pixels and a label); reinstall scikit-learn"
        )
    images = rows[:, :-1].reshape(-1, 1, 8, 8).astype(np.uint8)
    labels = rows[:, -1].astype(np.int64)
    train, test = stratified_holdout(labels, TEST_FRACTION, TEST_SPLIT_SEED)
    return RawSplits(images[train], labels[train], images[test], labels[test])
