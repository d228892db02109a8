"""The ``teacher_outputs`` stage: a teacher's logits of every batch its students will see, computed once.

A sweep of M logit methods (kd, dkd, dist, ckd) on one teacher runs the same teacher forward M
times over the same batches: each student's batches are a pure function of its seed, epoch, batch
size and augmentation (``stages.training.training_batches``). This stage replays those batches,
runs the teacher once and stores its logits in ``weights/<stage>/teacher_logits.npy``, an array
(rows, N, classes) that students memory-map (``TeacherOutputs``): row ``e`` holds epoch ``e``'s
logits of training sample ``i`` at ``[e, i]``. Without augmentation an image is the same in every
epoch, so one row serves every epoch, seed and batch size.

The batches are the students' own, batch for batch, so in float32 a cached student's losses are
the uncached student's bit for bit on a CPU; float16 (the default) halves the file and moves a
logit by at most 2**-11 of itself. The array is written in place in a ``.partial`` file, row by
row, with the number of finished rows checkpointed after each: a killed or requeued job goes on
from the first unfinished row, and the file gets its final name, and DONE its sha256, only whole.

With ``top_k`` the stage keeps three arrays instead (``StageFolders.teacher_top_k``): each
sample's k largest logits, their classes, and one stand-in logit for the other classes
(``top_k_with_fill``), from which ``TeacherOutputs`` rebuilds a full row of logits per sample.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from data.registry import Splits
from models.registry import tap_shapes
from models.taps import FeatureTaps
from pipeline.store import StageFolders
from stages.context import StageRun
from stages.files import StageError, load_torch, save_torch
from stages.loading import load_classifier, load_stage_data
from stages.training import TrainingSettings, training_batches


def _partial_file(final: Path) -> Path:
    return final.with_name(final.name + ".partial")


def _row_batches(data: Splits, settings: TrainingSettings, row: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(normalised images, indices) of row ``row``: epoch ``row``'s training batches, or with
    augmentation off, the training split once in order (the images every epoch shows)."""
    if settings.augment:
        for images, _, indices in training_batches(data, settings, epoch=row):
            yield images, indices
        return
    for start, images in zip(range(0, len(data.train_labels), settings.batch_size),
                             data.split_images("train", settings.batch_size)):
        yield data.normalise(images), torch.arange(start, start + len(images))


def _tables(
    folders: StageFolders, rows: int, samples: int, classes: int, dtype: str, top_k: int | None,
    feature_shapes: list[tuple[int, ...]],
) -> dict[Path, tuple[tuple[int, ...], str]]:
    """The arrays the stage writes, by final path: (shape, dtype). Logits first (all of them, or the
    top-k arrays), then one array per cached tap."""
    if top_k is None:
        tables = {folders.teacher_logits: ((rows, samples, classes), dtype)}
    else:
        if classes > np.iinfo(np.int16).max:
            raise StageError(f"top_k stores classes as int16, which cannot name {classes} classes; set top_k: null")
        values, classes_file, fill = folders.teacher_top_k
        tables = {values: ((rows, samples, top_k), dtype), classes_file: ((rows, samples, top_k), "int16"),
                  fill: ((rows, samples), "float32")}
    for path, shape in zip(folders.teacher_features(len(feature_shapes)), feature_shapes):
        tables[path] = ((rows, samples, *shape), dtype)
    return tables


def top_k_with_fill(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the k largest logits, their classes, the stand-in logit) of each row of float32 ``logits``.

    The stand-in is the log-mean-exp of the other C - k logits, log(mean_j exp(l_j)): put in for
    each of them, it keeps the softmax's normaliser, so at temperature 1 the teacher's
    probabilities of its top k classes are exact and the rest of its mass is shared evenly among
    the others. At another temperature, as KD's T = 4, the other classes' softened mass is
    approximated; with k = C - 1 the one other class gets its own logit and nothing is lost.
    """
    values, classes = logits.topk(k, dim=1)
    others = logits.scatter(1, classes, float("-inf"))
    fill = torch.logsumexp(others, dim=1) - math.log(logits.shape[1] - k)
    return values, classes, fill


def run(stage: StageRun) -> None:
    spec, device, folders = stage.spec, stage.device, stage.folders
    training = spec.settings["training"]
    settings = TrainingSettings.from_settings(training, seed=training["seed"])
    data = load_stage_data(spec, stage.upstream, stage.device)
    teacher = stage.prepare(load_classifier(stage.upstream["teacher"].final_weights, device).model, "teacher")
    taps = list(spec.settings.get("taps", []))
    tapped = FeatureTaps(teacher, taps)
    switches = stage.switches
    rows, top_k = (settings.epochs if settings.augment else 1), spec.settings.get("top_k")
    shapes = tap_shapes(spec.settings["teacher_arch"], tuple(data.image_shape), data.num_classes) if taps else {}
    tables = _tables(folders, rows, len(data.train_labels), data.num_classes, spec.settings["dtype"], top_k,
                     [shapes[tap] for tap in taps])
    for final in tables:  # named but not in a DONE: a job killed between the renames and DONE
        if final.is_file():
            os.replace(final, _partial_file(final))
    partials_there = all(_partial_file(final).is_file() for final in tables)
    done = load_torch(folders.checkpoint)["rows_done"] if folders.checkpoint.is_file() and partials_there else 0
    folders.weights.mkdir(parents=True, exist_ok=True)
    arrays = []
    for final, (shape, dtype) in tables.items():
        array = np.lib.format.open_memmap(_partial_file(final), mode="r+" if done else "w+", dtype=dtype, shape=shape)
        if array.shape != shape:
            raise StageError(f"{_partial_file(final)} holds {array.shape}, this stage writes {shape}; delete it and run again")
        arrays.append(array)
    started = time.perf_counter()
    for row in range(done, rows):
        for images, indices in _row_batches(data, settings, row):
            with torch.no_grad(), switches.autocast(device):
                logits, features = tapped(switches.inputs(images, device))
            logits = logits.float()
            parts = (logits,) if top_k is None else top_k_with_fill(logits, top_k)
            parts = (*parts, *(features[tap].float() for tap in taps))
            samples = indices.cpu().numpy()
            for array, part in zip(arrays, parts):
                array[row, samples] = part.cpu().numpy()
        for array in arrays:
            array.flush()
        save_torch(folders.checkpoint, {"rows_done": row + 1})
        stage.heartbeat()
    seconds = time.perf_counter() - started
    del arrays
    for final in tables:
        os.replace(_partial_file(final), final)
    log = dict(
        stage.record(seed=settings.seed), epochs=[], best_epoch=None, status="done", rows=rows, top_k=top_k, taps=taps,
        shape=[rows, len(data.train_labels), data.num_classes], dtype=spec.settings["dtype"],
        bytes=sum(final.stat().st_size for final in tables), resumed_at_row=done,
        images_per_second=round((rows - done) * len(data.train_labels) / seconds, 1) if seconds > 0 and rows > done else None,
    )
    stage.finish(log, list(tables), plots=False)


class TeacherOutputs:
    """A finished ``teacher_outputs`` stage's files, memory-mapped: what a student reads instead of its
    teacher. With ``top_k`` the logits of a batch are rebuilt: each sample's stand-in logit for
    every class, and its k kept logits in their classes (``top_k_with_fill``). ``taps`` are the
    teacher taps whose features the stage kept, in its settings' order.

    Indices on the host (data in host memory) read their rows from the files batch by batch. Indices
    on a GPU (data resident there) read from a copy of the epoch's whole row on that GPU, made once
    per epoch (CIFAR-100: 10 MB of float16 logits), so no step copies from the host.
    """

    def __init__(self, folders: StageFolders, num_classes: int):
        settings = json.loads(folders.config.read_text())["settings"]  # the stage's own: what it wrote
        self.top_k = settings.get("top_k") is not None
        self.taps = list(settings.get("taps", []))
        paths = [*(folders.teacher_top_k if self.top_k else (folders.teacher_logits,)), *folders.teacher_features(len(self.taps))]
        self.tables = [np.load(path, mmap_mode="r") for path in paths]
        self.num_classes = num_classes
        self._on_device: tuple[int, list[torch.Tensor]] | None = None

    def outputs(self, epoch: int, indices: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, dict[str | int, torch.Tensor]]:
        """The teacher's float32 logits and its features at ``taps`` of training samples ``indices`` in ``epoch``."""
        row = epoch if len(self.tables[0]) > 1 else 0
        if indices.device.type == "cpu":
            parts = [torch.from_numpy(table[row][indices.numpy()]) for table in self.tables]
        else:
            if self._on_device is None or self._on_device[0] != row or self._on_device[1][0].device != indices.device:
                self._on_device = (row, [torch.from_numpy(np.ascontiguousarray(table[row])).to(indices.device)
                                         for table in self.tables])
            parts = [part[indices] for part in self._on_device[1]]
        parts = [part.to(device) for part in parts]
        features = {tap: part.float() for tap, part in zip(self.taps, parts[len(parts) - len(self.taps):])}
        if not self.top_k:
            return parts[0].float(), features
        values, classes, fill = parts[:3]
        logits = fill[:, None].expand(len(fill), self.num_classes).clone()
        return logits.scatter_(1, classes.long(), values.float()), features


def cached_teacher_arch(folder_config: Path) -> str:
    """The teacher architecture a ``teacher_outputs`` stage ran, from its config.json."""
    return json.loads(folder_config.read_text())["settings"]["teacher_arch"]
