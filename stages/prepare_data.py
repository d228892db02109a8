"""The ``prepare_data`` stage: decode a folder data set once, for every stage of every sweep on its files.

Decoding Tiny ImageNet's 110,000 JPEGs takes minutes; every teacher, student and evaluation of a
sweep would pay that again. This stage reads the official parts once (``data.registry``: the
fingerprint checked first, the folder decoded, resized and centre-cropped) and writes them as one
uint8 torch file, ``weights/<stage>/images.pt``, atomically like every stage output; downstream
stages find it as their ``data`` upstream (``stages.loading.load_stage_data``), verified by DONE.
The file holds the official parts, not a split: all split seeds and validation fractions share it.
Full ImageNet, which streams (``data/streaming.py``), gets the same stage with its scanned file
list and labels in that file instead of images: listing 1.28M files on a shared file system takes
minutes, which then is paid once too.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from data.registry import read_official_parts
from data.splits import RawSplits, StreamedParts
from stages.context import StageRun
from stages.files import StageError, load_torch, save_torch

_PARTS = ("train_images", "train_labels", "test_images", "test_labels")
_STREAMED_PARTS = ("train_paths", "train_labels", "test_paths", "test_labels")


def save_prepared(path: Path, raw: RawSplits | StreamedParts) -> None:
    """The decoded images, or for a streamed data set the list of its files and labels."""
    if isinstance(raw, StreamedParts):
        save_torch(path, {"folder": str(raw.folder), "train_paths": list(raw.train_paths), "test_paths": list(raw.test_paths),
                          "train_labels": torch.from_numpy(raw.train_labels), "test_labels": torch.from_numpy(raw.test_labels)})
    else:
        save_torch(path, {part: torch.from_numpy(getattr(raw, part)) for part in _PARTS})


def load_prepared(path: Path) -> RawSplits | StreamedParts:
    """The official parts a ``prepare_data`` stage wrote; the arrays share the loaded tensors' memory."""
    saved = load_torch(path)
    if isinstance(saved, dict) and set(saved) == {"folder", *_STREAMED_PARTS}:
        return StreamedParts(
            folder=Path(saved["folder"]), train_paths=tuple(saved["train_paths"]), test_paths=tuple(saved["test_paths"]),
            train_labels=saved["train_labels"].numpy(), test_labels=saved["test_labels"].numpy(),
        )
    if not isinstance(saved, dict) or set(saved) != set(_PARTS):
        raise StageError(f"{path}: not a prepare_data file (expected the tensors {', '.join(_PARTS)})")
    return RawSplits(**{part: saved[part].numpy() for part in _PARTS})


def run(stage: StageRun) -> None:
    dataset = stage.spec.settings["dataset"]
    started = time.perf_counter()
    raw = read_official_parts(dataset["name"], stage.spec.runtime.get("data_root"), dataset["fingerprint"])
    decoded = time.perf_counter() - started
    save_prepared(stage.folders.prepared_images, raw)
    streamed = isinstance(raw, StreamedParts)
    log = dict(
        stage.record(seed=None), epochs=[], best_epoch=None, status="done", streamed=streamed,
        train_images=len(raw.train_labels), test_images=len(raw.test_labels),
        image_shape=None if streamed else list(raw.train_images.shape[1:]),
        bytes=None if streamed else int(raw.train_images.nbytes + raw.test_images.nbytes), decode_seconds=round(decoded, 2),
    )
    stage.finish(log, [stage.folders.prepared_images], plots=False)
