"""Stage: look inside one trained model: feature-map statistics and layer geometry at its taps.

The model runs in eval mode, as it predicts, on a seeded, class-balanced sample of each asked split
(the training split un-augmented, without the validation hold-out, and the test split): the same
images for every model of a data set, so a teacher and its students are compared on one sample.
Taps are read by forward hooks, as the methods read them (``models/taps.py``); with ``taps`` null,
every generalised layer. A method that deploys extra modules (simkd) is analysed as its
architecture alone, whose taps are the catalogue's.

Memory: one tap of resnet32x4 on 5,000 CIFAR images is 1.3 GB of float32, its generalised layers
together about 12 GB, and resnet18's first map at 160 px alone 8 GB. So one forward pass (stopped
once the last tap has run) writes each tap's features batch by batch to its own file in a temporary
folder (``$TMPDIR``: node-local scratch on a cluster, not the shared results tree), channel-major,
and the taps are then analysed one at a time, a few channels at a time (``analyse_tap``), each file
deleted once its tap is done: memory holds a group of channels and one Gram matrix, whatever the
tap's size. Re-running the network from the input for each tap instead would cost the 2-core CPU
about three times the one pass. Each tap's entry is checkpointed, so a requeued stage goes on from
the next tap (after one more forward pass, for the taps still to do).

Outputs (``pipeline/store.py``): ``analysis.json`` (every number), ``analysis.pkl`` (the numbers and
the arrays the figures draw: histograms, mean maps, log-power spectra; format in
``pipeline/analysis_plots.py``) and ``Layers.png`` when geometry is on. Statistics are also
computed at each halving of a map's size, so that ``report`` can compare a student's tap with a
teacher's larger one after pooling to the smaller size, as the feature losses do.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from analysis.feature_stats import (ChannelTerms, channel_terms, combine_channel_terms, histogram_counts,
                                    histogram_density, mean_log_power)
from analysis.geometry import GeometryOptions, GramAccumulator, flatten_for_geometry, geometry_pool_kernel, layer_geometry
from models.taps import generalised_layers, tap_module_name
from pipeline.analysis_plots import save_analysis_figures
from pipeline.store import done_digest, read_pickle, write_json, write_pickle
from stages.context import StageRun
from stages.files import StageError
from stages.loading import load_classifier, load_stage_data

LEGACY_SWITCHES = tuple(field.name for field in fields(GeometryOptions))
"""Set by the sweep's analysis keys of the same names (pipeline/sweep_schema.py)."""
SMALLEST_COMPARED_SIDE = 2
"""Statistics are kept at each halving of a map down to this side."""
GROUP_BYTES = 256 * 2**20
"""How much of a tap's features (float32) is read at a time, a few channels' worth: with the Gram
matrix and one float64 channel per statistics thread, what the analysis of one tap holds."""


def balanced_sample(labels: np.ndarray, samples: int, seed: int) -> tuple[np.ndarray, int]:
    """Sorted row indices of ``per_class`` images of every class present, and ``per_class``.

    ``per_class`` is ``samples // classes``, capped by the smallest class, so the sample is balanced
    exactly; each class's rows are a seeded random choice of its own.
    """
    classes, counts = np.unique(labels, return_counts=True)
    per_class = int(min(samples // len(classes), counts.min()))
    generator = np.random.default_rng(seed)
    rows = [generator.permutation(np.flatnonzero(labels == label))[:per_class] for label in classes]
    return np.sort(np.concatenate(rows)), per_class


class _GroupDone(BaseException):
    """Raised by the last tap, so the rest of the forward pass is skipped; a BaseException, so
    that no ``except Exception`` in a model's forward swallows it."""


class _TapRecorder:
    """Forward hooks that write the chosen modules' outputs (float32) to one file per tap in
    ``folder``, channel-major (``_TapFile``), keep each tap's smallest and largest value, and stop
    the forward pass once the last chosen module has run as often as it runs per pass."""

    def __init__(self, model: nn.Module, modules: Sequence[str], probe: _Probe, folder: Path, samples: int):
        self.files = {name: _TapFile(folder / f"{index}.f32", samples, probe.shapes[name])
                      for index, name in enumerate(modules)}
        self.ranges: dict[str, tuple[float, float]] = {}
        self._descriptors = {name: os.open(tap.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                             for name, tap in self.files.items()}
        self._written = dict.fromkeys(modules, 0)
        self._calls = probe.calls
        self._seen: dict[str, int] = {}
        self._last = modules[-1]
        self._view = getattr(model, "tap_view", None)
        named = dict(model.named_modules())
        self._handles = [named[name].register_forward_hook(self._hook(name)) for name in modules]

    def _hook(self, name: str) -> Callable[[nn.Module, Any, Tensor], None]:
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            seen = self._seen[name] = self._seen.get(name, 0) + 1
            if seen < self._calls[name]:
                return
            captured = (output if self._view is None else self._view(name, output)).detach().float().cpu()
            self._record(name, captured)
            if name == self._last and all(self._seen.get(other, 0) >= self._calls[other] for other in self._descriptors):
                raise _GroupDone

        return hook

    def _record(self, name: str, captured: Tensor) -> None:
        low, high = (float(value) for value in torch.aminmax(captured))
        if name in self.ranges:
            low, high = min(low, self.ranges[name][0]), max(high, self.ranges[name][1])
        self.ranges[name] = low, high
        tap, start = self.files[name], self._written[name]
        by_channel = np.ascontiguousarray(captured.numpy().swapaxes(0, 1))  # (C, batch, ...)
        for channel, values in enumerate(by_channel):
            _write_at(self._descriptors[name], memoryview(values).cast("B"), tap.offset(channel, start))
        self._written[name] = start + len(captured)

    def run(self, model: nn.Module, images: Tensor) -> None:
        self._seen = {}
        try:
            model(images)
        except _GroupDone:
            pass

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        for descriptor in self._descriptors.values():
            os.close(descriptor)


def _write_at(descriptor: int, data: memoryview, offset: int) -> None:
    """All of ``data`` at ``offset`` (``os.pwrite`` may write less than it is given)."""
    while data:
        written = os.pwrite(descriptor, data, offset)
        data, offset = data[written:], offset + written


@dataclass(frozen=True)
class _TapFile:
    """One tap's features on disk, channel-major: channel c's values for all ``samples`` (in sample
    order) lie together, so a channel, or a few, is one contiguous read. ``shape`` is one sample's
    (C, H, W) or (D,); an embedding's D values are its channels."""

    path: Path
    samples: int
    shape: tuple[int, ...]

    @property
    def channel_values(self) -> int:
        """float32 values of one channel of one sample."""
        return math.prod(self.shape[1:])

    def offset(self, channel: int, sample: int) -> int:
        """Byte offset of ``sample``'s values of ``channel``."""
        return 4 * self.channel_values * (channel * self.samples + sample)

    def channels(self, start: int, stop: int) -> Tensor:
        """Channels ``start`` to ``stop`` as an (N, stop - start, ...) view of one read."""
        values = np.fromfile(self.path, dtype=np.float32, count=(stop - start) * self.samples * self.channel_values,
                             offset=self.offset(start, 0))
        return torch.from_numpy(values.reshape(stop - start, self.samples, *self.shape[1:])).transpose(0, 1)

    def groups(self) -> Iterator[tuple[int, int]]:
        """(start, stop) of channel groups of at most ``GROUP_BYTES`` (one channel, when one is larger)."""
        per_group = max(1, GROUP_BYTES // (4 * self.samples * self.channel_values))
        for start in range(0, self.shape[0], per_group):
            yield start, min(start + per_group, self.shape[0])


@dataclass(frozen=True)
class _Probe:
    """What one forward pass shows of the tapped modules: the order of their last calls, how often
    each runs, and the per-sample shape of each one's (viewed) output."""

    order: list[str]
    calls: dict[str, int]
    shapes: dict[str, tuple[int, ...]]


def probe_taps(model: nn.Module, modules: Sequence[str], images: Tensor) -> _Probe:
    """``modules`` in the order their last call comes in one forward pass of ``images``, how often
    each runs, and each one's per-sample output shape."""
    named = dict(model.named_modules())
    view = getattr(model, "tap_view", None)
    calls: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    finished: list[str] = []

    def hook_for(name: str) -> Callable[[nn.Module, Any, Tensor], None]:
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            calls[name] = calls.get(name, 0) + 1
            shapes[name] = tuple((output if view is None else view(name, output)).shape[1:])
            if name in finished:
                finished.remove(name)
            finished.append(name)

        return hook

    handles = [named[name].register_forward_hook(hook_for(name)) for name in modules]
    try:
        model(images)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in modules if name not in calls]
    if missing:
        raise RuntimeError(f"taps {missing} did not run in {type(model).__name__}.forward()")
    return _Probe(finished, calls, shapes)


def halving_sizes(height: int, width: int) -> list[tuple[int, int]]:
    """(h, w) at each halving of a map's size while both sides are at least ``SMALLEST_COMPARED_SIDE``."""
    sizes = []
    while height // 2 >= SMALLEST_COMPARED_SIDE and width // 2 >= SMALLEST_COMPARED_SIDE:
        height, width = height // 2, width // 2
        sizes.append((height, width))
    return sizes


def analyse_tap(
    tap: _TapFile, value_range: tuple[float, float], labels: np.ndarray, settings: Mapping[str, Any], train_size: int,
    seconds: dict[str, float], device: torch.device = torch.device("cpu"),
) -> dict[str, Any]:
    """One tap's entry of the record: shape, statistics (at its size and each halving), geometry,
    histogram, mean map and log-power spectrum; the time each part took is added to ``seconds``.

    The tap is read a group of channels at a time (``_TapFile.groups``), and every part takes what
    it needs from each group: each channel's statistics, the group's slice of the Gram matrix, its
    histogram counts (over ``value_range``, the whole tap's) and its share of the mean map and
    spectrum. So one tap's memory is a group, the Gram matrix and a float64 channel per thread,
    whatever its channel count: resnet18's first map at 160 px is 8 GB for 5,000 images. The Gram
    matrix is multiplied on ``device`` (a GPU does resnet32x4's 5,000 x 65,536 in milliseconds, two
    CPU cores in 9 s); the statistics run on the CPU in float64."""
    analysis = settings["analysis"]
    maps = len(tap.shape) == 3
    sizes = [None, *halving_sizes(*tap.shape[1:])] if maps else [None]
    kernel = geometry_pool_kernel(tap.shape)
    gram = GramAccumulator(tap.samples, device) if analysis["geometry"] else None
    counts, mean_map, log_power, flat_length = 0.0, 0.0, 0.0, 0
    per_channel: list[ChannelTerms] = []
    workers = torch.get_num_threads()
    with ThreadPoolExecutor(workers) as pool:
        for start, stop in tap.groups():
            started = time.perf_counter()
            features = tap.channels(start, stop)
            seconds["forward"] += time.perf_counter() - started
            started = time.perf_counter()
            if analysis["stats"]:
                per_channel += pool.map(channel_terms, features.unbind(1), [sizes] * (stop - start))
            seconds["stats"] += time.perf_counter() - started
            started = time.perf_counter()
            if gram is not None:
                flat = flatten_for_geometry(features.to(device), kernel)
                flat_length += flat.shape[1]
                gram.add(flat)
                del flat
            seconds["geometry"] += time.perf_counter() - started
            started = time.perf_counter()
            counts = counts + histogram_counts(features, *value_range)
            if maps:
                mean_map = mean_map + features.sum(dim=(0, 1), dtype=torch.float64).numpy()
                log_power = log_power + mean_log_power(features) * (stop - start)
            seconds["arrays"] += time.perf_counter() - started
            del features
    entry: dict[str, Any] = {"shape": list(tap.shape), "stats": None, "stats_at": {}, "geometry": None}
    if analysis["stats"]:
        native, *pooled = combine_channel_terms(per_channel, len(sizes))
        entry["stats"] = asdict(native)
        entry["stats_at"] = {f"{h}x{w}": asdict(statistics) for (h, w), statistics in zip(sizes[1:], pooled)}
    started = time.perf_counter()
    if gram is not None:
        options = GeometryOptions(**{key: bool(analysis[key]) for key in LEGACY_SWITCHES})
        geometry = layer_geometry(gram.result(), labels, train_size, flat_length, options, int(analysis["seed"]))
        entry["geometry"] = geometry.as_dict()
    seconds["geometry"] += time.perf_counter() - started
    entry["histogram"] = histogram_density(counts, *value_range)
    entry["mean_map"] = mean_map / (tap.samples * tap.shape[0]) if maps else None
    entry["log_power"] = log_power / tap.shape[0] if maps else None
    return entry


def _sample_images(data: Any, split: str, rows: np.ndarray, batch_size: int) -> Iterator[Tensor]:
    """The uint8 images at ``rows`` of ``split``, unaugmented, batch by batch."""
    if split == "train":
        yield from data.epoch_images(torch.from_numpy(rows), batch_size, None)
        return
    start = 0
    for images in data.split_images(split, batch_size):
        chosen = rows[(rows >= start) & (rows < start + len(images))] - start
        start += len(images)
        if len(chosen):
            yield images[torch.from_numpy(chosen).to(images.device)]


def run(stage: StageRun) -> None:
    spec, device, folders = stage.spec, stage.device, stage.folders
    settings, analysis = spec.settings, spec.settings["analysis"]
    data = load_stage_data(spec, stage.upstream)
    trained = load_classifier(stage.upstream["model"].final_weights, device, deployed=False)
    model = stage.prepare(trained.model, spec.settings["role"])
    layers = generalised_layers(trained.model)
    wanted = layers if analysis["taps"] is None else analysis["taps"]
    resolved = [tap_module_name(trained.model, tap, layers) for tap in wanted]
    modules = list(dict.fromkeys(resolved))
    # A partial left by a run on other weights (the model stage rebuilt since) is not resumed.
    upstream = done_digest(stage.upstream["model"])
    partial = read_pickle(folders.analysis_partial) if folders.analysis_partial.is_file() else {}
    if partial.get("upstream") != upstream:
        partial = {"upstream": upstream}
    splits = {split: _analyse_split(stage, data, model, modules, split, partial) for split in analysis["splits"]}
    seconds = partial["seconds"]
    record = {
        "model_stage": stage.upstream["model"].name, "arch": trained.arch, "role": settings["role"],
        "method": settings["student_method"], "dataset": settings["dataset"]["name"], "num_classes": data.num_classes,
        "taps_asked": analysis["taps"], "asked_tap_modules": None if analysis["taps"] is None else resolved,
        "taps": next(iter(splits.values()))["order"],
        "splits": {split: {key: value for key, value in part.items() if key != "order"} for split, part in splits.items()},
        "seconds": {key: round(value, 2) for key, value in seconds.items()},
    }
    numbers = analysis_numbers(record)
    write_json(folders.analysis_numbers, numbers)
    write_pickle(folders.analysis_record, record)
    figures = save_analysis_figures(record, folders.logs, split="train" if "train" in splits else next(iter(splits)))
    log = dict(stage.record(seed=None), epochs=[], status="done", analysis=numbers)
    stage.finish(log, [folders.analysis_numbers, folders.analysis_record, *figures], plots=False)
    folders.analysis_partial.unlink(missing_ok=True)


def _analyse_split(
    stage: StageRun, data: Any, model: nn.Module, modules: list[str], split: str, partial: dict[str, Any],
) -> dict[str, Any]:
    """One split's sample, taps and entries; each tap's entry is checkpointed in ``partial``."""
    settings, analysis, device = stage.spec.settings, stage.spec.settings["analysis"], stage.device
    seconds = partial.setdefault("seconds", dict.fromkeys(("forward", "stats", "geometry", "arrays"), 0.0))
    labels = {"train": data.train_labels, "test": data.test_labels}[split].cpu().numpy()
    rows, per_class = balanced_sample(labels, int(analysis["samples"]), int(analysis["seed"]))
    if analysis["geometry"] and per_class < 2:
        raise StageError(f"{stage.spec.name}: the {split} split's smallest class has {per_class} image(s); geometry "
                         "needs two of every class (set analysis.geometry false or analysis.splits without it)")
    switches, batch_size = stage.switches, int(settings["batch_size"])

    def batches(chosen: np.ndarray) -> Iterator[Tensor]:
        for images in _sample_images(data, split, chosen, batch_size):
            images = data.normalise(images.to(device))
            yield images.to(memory_format=torch.channels_last) if switches.channels_last else images

    done = partial.setdefault("splits", {}).setdefault(split, {})
    with torch.no_grad(), switches.autocast(device):
        probe = probe_taps(model, modules, next(batches(rows[:2])))
        names = [name for name in probe.order if name not in done]
        if not names:
            return _split_part(rows, per_class, probe.order, done)
        needed = 4 * len(rows) * sum(math.prod(probe.shapes[name]) for name in names)
        with tempfile.TemporaryDirectory(prefix=f"kdbench-{stage.spec.name}-") as scratch:
            free = shutil.disk_usage(scratch).free
            if needed > free:
                raise StageError(f"{stage.spec.name}: the {split} split's features take {needed / 1e9:.1f} GB of "
                                 f"temporary files, but {scratch} has {free / 1e9:.1f} GB free; point TMPDIR at a "
                                 "larger disk, or set analysis.taps or analysis.samples lower")
            started = time.perf_counter()
            recorder = _TapRecorder(model, names, probe, Path(scratch), len(rows))
            try:
                for images in batches(rows):
                    recorder.run(model, images)
            finally:
                recorder.close()
            seconds["forward"] += time.perf_counter() - started
            for name in names:
                tap = recorder.files[name]
                done[name] = analyse_tap(tap, recorder.ranges[name], labels[rows], settings, len(data.train_labels),
                                         seconds, device)
                tap.path.unlink()
                stage.heartbeat()  # a runner that lost its lease stops before it writes
                write_pickle(stage.folders.analysis_partial, partial)
    return _split_part(rows, per_class, probe.order, done)


def _split_part(rows: np.ndarray, per_class: int, order: list[str], done: Mapping[str, Any]) -> dict[str, Any]:
    return {"samples": len(rows), "per_class": per_class, "order": order, "taps": {name: done[name] for name in order}}


def analysis_numbers(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record without its arrays: what analysis.json holds and ``report`` reads. NaN (a
    statistic with no value, such as a constant tap's spatial terms) becomes null, as JSON has no NaN."""
    numbers = {key: value for key, value in record.items() if key != "splits"}
    numbers["splits"] = {
        split: {"samples": part["samples"], "per_class": part["per_class"], "taps": {
            tap: {key: entry[key] for key in ("shape", "stats", "stats_at", "geometry")}
            for tap, entry in part["taps"].items()}}
        for split, part in record["splits"].items()
    }
    return _without_nan(numbers)


def _without_nan(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _without_nan(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_nan(item) for item in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
