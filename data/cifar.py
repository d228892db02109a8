"""CIFAR-10 and CIFAR-100 read from the official "python version" files (Krizhevsky, 2009).

The data root holds either the extracted folder (``cifar-10-batches-py/``, ``cifar-100-python/``)
or the untouched archive (``cifar-10-python.tar.gz``, ``cifar-100-python.tar.gz``); members are read
straight out of the archive, so a shared read-only data folder needs no extracted copy. Which of
the two is read is decided in ``data/files.py``, which the planner's fingerprint uses too. Each
file is a Python 2 pickle of a dict with bytes keys; ``b"data"`` is N x 3072 uint8, a row being the
32x32 red plane, then green, then blue, each row-major. The unpickler builds numpy arrays, bytes
and plain containers only, so a tampered file cannot run code; the same data re-saved from
Python 3 with pickle protocol 2 loads too.
"""
from __future__ import annotations

import pickle
import zlib
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from data.augment import RandomCropFlip
from data.errors import DatasetCorruptError, one_line
from data.files import OFFICIAL_PAGE, CifarLayout, cifar_source
from data.splits import RawSplits

DATASETS = {
    "cifar10": {
        "num_classes": 10,
        "image_shape": [3, 32, 32],
        "needs_root": True,
        "train_images": 50000,
        "summary": "CIFAR-10: 50,000 train / 10,000 test 32x32 colour images, 10 classes (cifar-10-python.tar.gz)",
    },
    "cifar100": {
        "num_classes": 100,
        "image_shape": [3, 32, 32],
        "needs_root": True,
        "train_images": 50000,
        "summary": "CIFAR-100: 50,000 train / 10,000 test 32x32 colour images, 100 classes (cifar-100-python.tar.gz)",
    },
}

AUGMENT = RandomCropFlip(pad=4, flip=True)
"""The standard CIFAR recipe of the ResNet paper and the CRD benchmarks: pad 4, crop 32, mirror half."""

_LABEL_KEYS = {"cifar10": (b"labels", b"label_names"), "cifar100": (b"fine_labels", b"fine_label_names")}
"""Per variant, the batch key of the labels and the meta key of the class names."""


@dataclass(frozen=True)
class _Member:
    """One unpickled file, with where it came from for error messages."""

    where: str
    content: dict[bytes, Any]


class _Refused(pickle.UnpicklingError):
    """A global the safe unpickler will not call; ``what`` names it for the user."""

    def __init__(self, what: str):
        super().__init__(f"refusing to load {what}")
        self.what = what


def _latin1_bytes(text: Any, codec: Any = "utf-8") -> bytes:
    """``_codecs.encode`` as pickle protocol 2 uses it to write bytes from Python 3: latin1 only.

    The default is ``codecs.encode``'s own, so a one-argument call is refused by name too.
    """
    if type(text) is not str or codec not in ("latin1", "latin-1"):
        raise _Refused(f"_codecs.encode with codec {codec!r} (only 'latin1', as pickle protocol 2 writes bytes)")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    """``bytes()`` as pickle protocol 2 writes b'' from Python 3; any argument is refused."""
    if args:
        raise _Refused("bytes called with arguments (only bytes() for b'', as pickle protocol 2 writes it)")
    return b""


class _ArrayUnpickler(pickle.Unpickler):
    """Resolves only the globals that numpy arrays and bytes need, so a tampered file cannot run code.

    The official files (Python 2) need numpy's array rebuild only; the same data re-saved under
    Python 3 with protocol 2 also writes each bytes object as ``_codecs.encode(str, "latin1")``
    (and b'' as ``bytes()``), which are allowed in that one form.
    """

    _NUMPY = frozenset({
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    })
    _BYTES = {("_codecs", "encode"): _latin1_bytes, ("__builtin__", "bytes"): _empty_bytes,
              ("builtins", "bytes"): _empty_bytes}
    ALLOWED = (*(f"{module}.{name}" for module, name in sorted(_NUMPY)), "_codecs.encode (latin1)", "bytes()")

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._BYTES:
            return self._BYTES[module, name]
        if (module, name) not in self._NUMPY:
            raise _Refused(f"{module}.{name}")
        return super().find_class(module, name)


def _unpickle(where: str, stream: IO[bytes]) -> _Member:
    try:
        content = _ArrayUnpickler(stream, encoding="bytes").load()
    except _Refused as error:
        raise DatasetCorruptError(
            f"{where}: refused to unpickle {error.what}: the safe CIFAR reader accepts only plain data (numpy "
            f"arrays, bytes, numbers, lists, dicts) so that a data file cannot run code (allowed: "
            f"{', '.join(_ArrayUnpickler.ALLOWED)}); re-save its arrays and label lists as plain data, or download "
            f"the official file again from {OFFICIAL_PAGE}"
        ) from error
    except (EOFError, zlib.error) as error:
        raise DatasetCorruptError(f"{where} is truncated ({one_line(error)}); download it again from {OFFICIAL_PAGE}") from error
    except pickle.UnpicklingError as error:
        problem = "is truncated" if "truncated" in str(error) else "is not a CIFAR python pickle"
        raise DatasetCorruptError(f"{where} {problem} ({one_line(error)}); download it again from {OFFICIAL_PAGE}") from error
    except OSError as error:
        raise DatasetCorruptError(
            f"{where} cannot be read ({one_line(error)}); download it again from {OFFICIAL_PAGE}"
        ) from error
    except (ValueError, TypeError, AttributeError, IndexError, KeyError) as error:
        raise DatasetCorruptError(
            f"{where} is not a CIFAR python pickle ({one_line(error)}); download it again from {OFFICIAL_PAGE}"
        ) from error
    if not isinstance(content, dict):
        raise DatasetCorruptError(f"{where} holds a {type(content).__name__}, not a CIFAR dict; download it again")
    return _Member(where, content)


def _check_class_names(member: _Member, layout: CifarLayout, names_key: bytes, num_classes: int) -> None:
    """The meta file tells CIFAR-10 from CIFAR-100 for sure, so a swapped folder fails here, not later."""
    names = member.content.get(names_key)
    if not isinstance(names, list) or len(names) != num_classes:
        raise DatasetCorruptError(
            f"{member.where} does not list {num_classes} class names under {names_key!r}; is it {layout.title}?"
        )


def _images_and_labels(
    member: _Member, layout: CifarLayout, label_key: bytes, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    data, labels = member.content.get(b"data"), member.content.get(label_key)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072
            and isinstance(labels, list) and len(labels) == len(data)):
        raise DatasetCorruptError(
            f"{member.where} is not a {layout.title} batch: expected b'data' (N x 3072 uint8) and "
            f"{label_key!r} (N labels)"
        )
    labels_array = np.asarray(labels, dtype=np.int64)
    if labels_array.size and not 0 <= labels_array.min() <= labels_array.max() < num_classes:
        raise DatasetCorruptError(f"{member.where} has labels outside 0..{num_classes - 1}; is it {layout.title}?")
    return data.reshape(-1, 3, 32, 32), labels_array


def read(name: str, root: str | None) -> RawSplits:
    """The official train and test parts of ``name`` ("cifar10" or "cifar100") found under ``root``."""
    source, num_classes = cifar_source(name, root), DATASETS[name]["num_classes"]
    layout, (label_key, names_key) = source.layout, _LABEL_KEYS[name]
    members = source.read_each(_unpickle)
    _check_class_names(members[layout.meta_member], layout, names_key, num_classes)
    train = [_images_and_labels(members[member], layout, label_key, num_classes) for member in layout.train_members]
    test_images, test_labels = _images_and_labels(members[layout.test_member], layout, label_key, num_classes)
    # CIFAR-100's one training member is used as it is: concatenating would hold a second 150 MB copy at the peak.
    return RawSplits(
        train[0][0] if len(train) == 1 else np.concatenate([images for images, _ in train]),
        train[0][1] if len(train) == 1 else np.concatenate([labels for _, labels in train]),
        test_images,
        test_labels,
    )
