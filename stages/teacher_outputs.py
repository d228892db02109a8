"""The ``teacher_outputs`` stage: a teacher's logits of every batch its students will see, computed once.

A sweep of M logit methods (kd, dkd, dist, ckd) on one teacher runs the same teacher forward M
times over the same batches: each student's batches are a pure function of its seed, epoch, batch
size and augmentation (``stages.training.training_batches``). This stage replays those batches,
runs the teacher once and stores its logits in ``weights/<stage>/teacher_logits.npy``, an array
(rows, N, classes) that students memory-map (``TeacherLogits``): row ``e`` holds epoch ``e``'s
logits of training sample ``i`` at ``[e, i]``. Without augmentation an image is the same in every
epoch, so one row serves every epoch, seed and batch size.

The batches are the students' own, batch for batch, so in float32 a cached student's losses are
the uncached student's bit for bit on a CPU; float16 (the default) halves the file and moves a
logit by at most 2**-11 of itself. The array is written in place in a ``.partial`` file, row by
row, with the number of finished rows checkpointed after each: a killed or requeued job goes on
from the first unfinished row, and the file gets its final name, and DONE its sha256, only whole.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from data.registry import Splits
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


def run(stage: StageRun) -> None:
    spec, device, folders = stage.spec, stage.device, stage.folders
    training = spec.settings["training"]
    settings = TrainingSettings.from_settings(training, seed=training["seed"])
    data = load_stage_data(spec, stage.upstream, stage.device)
    teacher = stage.prepare(load_classifier(stage.upstream["teacher"].final_weights, device).model, "teacher")
    switches = stage.switches
    rows = settings.epochs if settings.augment else 1
    shape = (rows, len(data.train_labels), data.num_classes)
    final, partial = folders.teacher_logits, _partial_file(folders.teacher_logits)
    if final.is_file():  # named but not in a DONE: a job killed between the rename and DONE
        os.replace(final, partial)
    done = load_torch(folders.checkpoint)["rows_done"] if folders.checkpoint.is_file() and partial.is_file() else 0
    folders.weights.mkdir(parents=True, exist_ok=True)
    table = np.lib.format.open_memmap(partial, mode="r+" if done else "w+", dtype=spec.settings["dtype"], shape=shape)
    if table.shape != shape:
        raise StageError(f"{partial} holds {table.shape}, this stage writes {shape}; delete it and run again")
    started = time.perf_counter()
    for row in range(done, rows):
        for images, indices in _row_batches(data, settings, row):
            with torch.no_grad(), switches.autocast(device):
                logits = teacher(switches.inputs(images, device))
            table[row, indices.cpu().numpy()] = logits.float().cpu().numpy()
        table.flush()
        save_torch(folders.checkpoint, {"rows_done": row + 1})
        stage.heartbeat()
    seconds = time.perf_counter() - started
    del table
    os.replace(partial, final)
    log = dict(
        stage.record(seed=settings.seed), epochs=[], best_epoch=None, status="done", rows=rows,
        shape=list(shape), dtype=spec.settings["dtype"], bytes=final.stat().st_size, resumed_at_row=done,
        images_per_second=round((rows - done) * shape[1] / seconds, 1) if seconds > 0 and rows > done else None,
    )
    stage.finish(log, [final], plots=False)


class TeacherLogits:
    """A finished ``teacher_outputs`` file, memory-mapped: what a student reads instead of its teacher.

    Indices on the host (data in host memory) read their rows from the file batch by batch. Indices
    on a GPU (data resident there) read from a copy of the epoch's whole row on that GPU, made once
    per epoch (CIFAR-100: 10 MB in float16), so no step copies from the host.
    """

    def __init__(self, path: Path):
        self.table = np.load(path, mmap_mode="r")
        self._on_device: tuple[int, torch.Tensor] | None = None

    def batch(self, epoch: int, indices: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The teacher's float32 logits (N, classes) of training samples ``indices`` in ``epoch``."""
        row = epoch if len(self.table) > 1 else 0
        if indices.device.type == "cpu":
            return torch.from_numpy(self.table[row][indices.numpy()]).to(device).float()
        if self._on_device is None or self._on_device[0] != row or self._on_device[1].device != indices.device:
            self._on_device = (row, torch.from_numpy(np.ascontiguousarray(self.table[row])).to(indices.device))
        return self._on_device[1][indices].to(device).float()


def cached_teacher_arch(folder_config: Path) -> str:
    """The teacher architecture a ``teacher_outputs`` stage ran, from its config.json."""
    return json.loads(folder_config.read_text())["settings"]["teacher_arch"]
