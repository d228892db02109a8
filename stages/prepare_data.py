"""The ``prepare_data`` stage: decode a folder data set once, for every stage of every sweep on its files.

Decoding Tiny ImageNet's 110,000 JPEGs takes minutes; every teacher, student and evaluation of a
sweep would pay that again. This stage reads the official parts once (``data.registry``: the
fingerprint checked first, the folder decoded, resized and centre-cropped) and writes them as one
uint8 torch file, ``weights/<stage>/images.pt``, atomically like every stage output; downstream
stages find it as their ``data`` upstream (``stages.loading.load_stage_data``), verified by DONE.
The file holds the official parts, not a split: all split seeds and validation fractions share it.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from data.registry import read_official_parts
from data.splits import RawSplits
from stages.context import StageRun
from stages.files import StageError, load_torch, save_torch

_PARTS = ("train_images", "train_labels", "test_images", "test_labels")


def save_prepared(path: Path, raw: RawSplits) -> None:
    save_torch(path, {part: torch.from_numpy(getattr(raw, part)) for part in _PARTS})


def load_prepared(path: Path) -> RawSplits:
    """The official parts a ``prepare_data`` stage wrote; the arrays share the loaded tensors' memory."""
    saved = load_torch(path)
    if not isinstance(saved, dict) or set(saved) != set(_PARTS):
        raise StageError(f"{path}: not a prepare_data file (expected the tensors {', '.join(_PARTS)})")
    return RawSplits(**{part: saved[part].numpy() for part in _PARTS})


def run(stage: StageRun) -> None:
    dataset = stage.spec.settings["dataset"]
    started = time.perf_counter()
    raw = read_official_parts(dataset["name"], stage.spec.runtime.get("data_root"), dataset["fingerprint"])
    decoded = time.perf_counter() - started
    save_prepared(stage.folders.prepared_images, raw)
    log = dict(
        stage.record(seed=None), epochs=[], best_epoch=None, status="done",
        train_images=len(raw.train_labels), test_images=len(raw.test_labels),
        image_shape=list(raw.train_images.shape[1:]),
        bytes=int(raw.train_images.nbytes + raw.test_images.nbytes), decode_seconds=round(decoded, 2),
    )
    stage.finish(log, [stage.folders.prepared_images], plots=False)
