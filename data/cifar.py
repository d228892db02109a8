"""CIFAR-10 and CIFAR-100 read from the official "python version" files (Krizhevsky, 2009).

The data root holds either the extracted folder (``cifar-10-batches-py/``, ``cifar-100-python/``)
or the untouched archive (``cifar-10-python.tar.gz``, ``cifar-100-python.tar.gz``); members are read
straight out of the archive, so a shared read-only data folder needs no extracted copy. Each file is
a Python 2 pickle of a dict with bytes keys; ``b"data"`` is N x 3072 uint8, a row being the 32x32
red plane, then green, then blue, each row-major. The unpickler builds numpy arrays and plain
containers only, so a tampered file cannot run code.
"""
from __future__ import annotations

import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from data.augment import RandomCropFlip
from data.errors import DatasetCorruptError, DatasetNotFoundError
from data.splits import RawSplits

DATASETS = {
    "cifar10": {
        "num_classes": 10,
        "image_shape": [3, 32, 32],
        "needs_root": True,
        "summary": "CIFAR-10: 50,000 train / 10,000 test 32x32 colour images, 10 classes (cifar-10-python.tar.gz)",
    },
    "cifar100": {
        "num_classes": 100,
        "image_shape": [3, 32, 32],
        "needs_root": True,
        "summary": "CIFAR-100: 50,000 train / 10,000 test 32x32 colour images, 100 classes (cifar-100-python.tar.gz)",
    },
}

AUGMENT = RandomCropFlip(pad=4, flip=True)
"""The standard CIFAR recipe of the ResNet paper and the CRD benchmarks: pad 4, crop 32, mirror half."""

OFFICIAL_PAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"


@dataclass(frozen=True)
class _Layout:
    """Where one CIFAR variant keeps its files, as the official archive lays them out."""

    title: str
    folder: str
    archive: str
    train_members: tuple[str, ...]
    test_member: str
    meta_member: str
    label_key: bytes
    class_names_key: bytes

    @property
    def members(self) -> tuple[str, ...]:
        return (*self.train_members, self.test_member, self.meta_member)


_LAYOUTS = {
    "cifar10": _Layout(
        "CIFAR-10", "cifar-10-batches-py", "cifar-10-python.tar.gz",
        tuple(f"data_batch_{number}" for number in range(1, 6)), "test_batch", "batches.meta",
        b"labels", b"label_names",
    ),
    "cifar100": _Layout(
        "CIFAR-100", "cifar-100-python", "cifar-100-python.tar.gz",
        ("train",), "test", "meta",
        b"fine_labels", b"fine_label_names",
    ),
}


@dataclass(frozen=True)
class _Member:
    """One unpickled file, with where it came from for error messages."""

    where: str
    content: dict[bytes, Any]


class _ArrayUnpickler(pickle.Unpickler):
    """Resolves only the globals that a pickled numpy array needs (old and new numpy module names)."""

    _ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


def _unpickle(stream: IO[bytes], where: str) -> _Member:
    try:
        content = _ArrayUnpickler(stream, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OSError, zlib.error) as error:
        raise DatasetCorruptError(
            f"{where} is truncated or not a CIFAR python pickle ({_one_line(error)}); download it again"
        ) from error
    if not isinstance(content, dict):
        raise DatasetCorruptError(f"{where} holds a {type(content).__name__}, not a CIFAR dict; download it again")
    return _Member(where, content)


def _from_folder(folder: Path, layout: _Layout) -> dict[str, _Member]:
    members = {}
    for member in layout.members:
        path = folder / member
        if not path.is_file():
            raise DatasetNotFoundError(
                f"{layout.title} is incomplete: {path} is missing; download {layout.archive} from {OFFICIAL_PAGE} "
                f"and extract it into {folder.parent}"
            )
        with path.open("rb") as stream:
            members[member] = _unpickle(stream, str(path))
    return members


def _from_archive(archive: Path, layout: _Layout) -> dict[str, _Member]:
    """The members read in one pass over the gzip stream (seeking back in a .tar.gz re-inflates it)."""
    wanted = {f"{layout.folder}/{member}": member for member in layout.members}
    members = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for entry in tar:
                member = wanted.get(entry.name.removeprefix("./"))
                if member is not None and entry.isfile():
                    members[member] = _unpickle(tar.extractfile(entry), f"{archive}:{entry.name}")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise DatasetCorruptError(
            f"{archive} is truncated or not a .tar.gz ({_one_line(error)}); download it again from {OFFICIAL_PAGE}"
        ) from error
    missing = [name for name, member in wanted.items() if member not in members]
    if missing:
        raise DatasetCorruptError(f"{archive} lacks {', '.join(missing)}; download it again from {OFFICIAL_PAGE}")
    return members


def _find_members(layout: _Layout, root: str | None) -> dict[str, _Member]:
    if root is None:
        raise DatasetNotFoundError(
            f"{layout.title} needs a data root: set the sweep key 'data_root' or env KDBENCH_DATA to a folder "
            f"holding {layout.folder}/ or {layout.archive} (download {layout.archive} from {OFFICIAL_PAGE})"
        )
    folder, archive = Path(root) / layout.folder, Path(root) / layout.archive
    if folder.is_dir():
        return _from_folder(folder, layout)
    if archive.is_file():
        return _from_archive(archive, layout)
    raise DatasetNotFoundError(
        f"{layout.title} not found: looked for {folder}/ and {archive} (the root comes from the sweep key "
        f"'data_root' or env KDBENCH_DATA); download {layout.archive} (python version) from {OFFICIAL_PAGE} "
        f"and extract it into {root}"
    )


def _check_class_names(member: _Member, layout: _Layout, num_classes: int) -> None:
    """The meta file tells CIFAR-10 from CIFAR-100 for sure, so a swapped folder fails here, not later."""
    names = member.content.get(layout.class_names_key)
    if not isinstance(names, list) or len(names) != num_classes:
        raise DatasetCorruptError(
            f"{member.where} does not list {num_classes} class names under {layout.class_names_key!r}; "
            f"is it {layout.title}?"
        )


def _images_and_labels(member: _Member, layout: _Layout, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    data, labels = member.content.get(b"data"), member.content.get(layout.label_key)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072
            and isinstance(labels, list) and len(labels) == len(data)):
        raise DatasetCorruptError(
            f"{member.where} is not a {layout.title} batch: expected b'data' (N x 3072 uint8) and "
            f"{layout.label_key!r} (N labels)"
        )
    labels_array = np.asarray(labels, dtype=np.int64)
    if labels_array.size and not 0 <= labels_array.min() <= labels_array.max() < num_classes:
        raise DatasetCorruptError(f"{member.where} has labels outside 0..{num_classes - 1}; is it {layout.title}?")
    return data.reshape(-1, 3, 32, 32), labels_array


def read(name: str, root: str | None) -> RawSplits:
    """The official train and test parts of ``name`` ("cifar10" or "cifar100") found under ``root``."""
    layout, num_classes = _LAYOUTS[name], DATASETS[name]["num_classes"]
    members = _find_members(layout, root)
    _check_class_names(members[layout.meta_member], layout, num_classes)
    train = [_images_and_labels(members[member], layout, num_classes) for member in layout.train_members]
    test_images, test_labels = _images_and_labels(members[layout.test_member], layout, num_classes)
    return RawSplits(
        np.concatenate([images for images, _ in train]),
        np.concatenate([labels for _, labels in train]),
        test_images,
        test_labels,
    )
