"""``data check``: is a data folder fit for a sweep? Answered before anything is submitted.

A sweep that finds a corrupt JPEG two hours into its teacher job wastes the queue wait and the
two hours; this check reads the folder the way the stages will (layout, class count, every image
decoded) and reports on one screen what it found, naming the files that fail. Folder layouts
(``data/layouts.py``) keep going past a bad file so the report names all of them; the other data
sets (CIFAR, digits) are read with their own readers, where a successful read is a pass.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from data import imagefolder
from data.errors import DatasetError
from data.layouts import LAYOUT_NAMES, FolderLayout, scan
from data.registry import dataset_names, load_dataset

SHOWN_FAILURES = 10


def check_data(name: str, root: str | None) -> tuple[bool, str]:
    """(passed, report) for data set ``name`` under ``root``; the report is a few lines of text."""
    if name not in dataset_names():
        return False, f"unknown data set {name!r}; allowed: {', '.join(dataset_names())}"
    try:
        if name in LAYOUT_NAMES:
            return _check_folder(name, scan(name, root))
        return _check_by_reading(name, root)
    except DatasetError as error:
        return False, f"{name}: FAILED\n{error}"


def _class_counts(labels: np.ndarray, num_classes: int) -> str:
    counts = np.bincount(labels, minlength=num_classes)
    return f"per class min {counts.min()}, max {counts.max()}"


def _check_folder(name: str, layout: FolderLayout) -> tuple[bool, str]:
    _, height, width = imagefolder.DATASETS[name]["image_shape"]
    splits = {"train": layout.train, "test (val/)": layout.test}
    paths = [layout.folder / path for files in splits.values() for path, _ in files]
    failures: list[str] = []
    lock = threading.Lock()

    def try_decode(_: int, path: Path) -> None:
        try:
            imagefolder.load_image(path, height, width)
        except DatasetError:
            with lock:
                failures.append(path.relative_to(layout.folder).as_posix())

    imagefolder.decode_in_parallel(paths, try_decode)
    lines = [f"{name}: {layout.folder}", f"classes: {len(layout.classes)} ({layout.classes[0]} .. {layout.classes[-1]})"]
    for split, files in splits.items():
        labels = np.fromiter((label for _, label in files), dtype=np.int64, count=len(files))
        lines.append(f"{split}: {len(files)} images, {_class_counts(labels, len(layout.classes))}")
    lines.append(f"decoded: {len(paths) - len(failures)} of {len(paths)} images (as {height}x{width} RGB)")
    if failures:
        failures.sort()
        lines.append(f"unreadable: {len(failures)} files:")
        lines.extend(f"  {path}" for path in failures[:SHOWN_FAILURES])
        if len(failures) > SHOWN_FAILURES:
            lines.append(f"  ... and {len(failures) - SHOWN_FAILURES} more")
    if name == "imagenet" and len(layout.train) > imagefolder.IMAGENET_IN_MEMORY:
        lines.append(f"note: over {imagefolder.IMAGENET_IN_MEMORY} training images, so stages must stream it")
    lines.append("FAILED" if failures else "passed")
    return not failures, "\n".join(lines)


def _check_by_reading(name: str, root: str | None) -> tuple[bool, str]:
    splits = load_dataset(name, root, val_fraction=0.0, split_seed=0)
    lines = [f"{name}: {root if root is not None else 'bundled'}", f"classes: {splits.num_classes}"]
    for split, labels in (("train", splits.train_labels), ("test", splits.test_labels)):
        lines.append(f"{split}: {len(labels)} images, {_class_counts(labels.numpy(), splits.num_classes)}")
    lines.append(f"image shape: {list(splits.image_shape)}")
    lines.append("passed")
    return True, "\n".join(lines)
