"""The GPU path's figures (issue 9), on a GPU when there is one, on the CPU otherwise.

resnet32x4 distils into resnet8x4 with kd (T 4, 0.1 CE + 0.9 KD, SGD lr 0.05) on a CIFAR-100 in the
official python format (``--images`` training images, a fifth as many test images, as CIFAR-100's
50,000 / 10,000), at each of ``--batch-sizes``. On CUDA every row runs bf16 autocast, channels-last
models and batches and cudnn.benchmark (the stages' ``amp``, ``channels_last``, ``cudnn_benchmark``);
on a CPU all rows run float32, as the stages do there. Rows (``--rows``):

* ceiling: a tight loop on one synthetic normalised batch already on the device: teacher no-grad
  forward, student forward, the kd loss (``distill.kd``'s formula), backward, SGD step; images/s
  over an epoch's worth of steps after warm-up steps, the device synchronised before each clock read.
* stage: kdbench's train_student stage for kd, run in this process (``stages.run_stage``; its
  teacher trains beforehand, not counted), 2 epochs, no validation split. The figure is the training
  images / the wall clock from the end of epoch 1's training and scoring to the end of epoch 2's,
  read at the loop's per-epoch ``heartbeat``: epoch 1's checkpoint and log write, then epoch 2's
  batches (data path, augmentation), steps and test scoring. log.pkl's ``epoch_time_s``, the same
  without the checkpoint and log write, is shown beside it. Goal: >= 0.90 of the ceiling.
* repdistiller: RepDistiller's ``train_distill`` loop with kd: torchvision's CIFAR100 with PIL
  RandomCrop(32, 4) + flip + ToTensor + Normalize, a shuffled DataLoader with 8 workers (on a CPU,
  at most its core count) and pinned memory on CUDA, per step the batch's copy to the device, both
  forwards, CE + their DistillKL, the AverageMeters' ``.item()`` reads, backward and SGD step;
  images/s over one epoch after the first batches (the workers' start-up left out). RepDistiller
  trains float32 NCHW; here it gets kdbench's switches, so its ratio is the loop's, not the
  precision's. Goal: the stage >= 3x its images/s.
* cache: a sweep of five logit methods (kd, dkd, dist, ckd, kd+dist), batch 64, ``--epochs`` per
  student; the students' total wall clock each running its teacher, against ``teacher_cache`` (one
  ``teacher_outputs`` stage, counted in, plus the five students reading its file). Goal: >= 1.8x.
* same-images: on CUDA, whether a resident data set's first epoch of training batches (the
  benchmark's CIFAR-100, picked, cropped, flipped and normalised on the GPU) equals the CPU's, batch
  for batch (a check, not a speed: resume and the teacher cache rest on it).
* ddp: the stage row's student (``resources.train_student.gpus``: kd's loss is a mean of per-sample
  terms, so it may take several ranks) through the local backend, as ``runner.py submit`` runs it,
  on 1 GPU and on all of them; images/s of epoch 2 from its ``epoch_time_s`` (training and rank 0's
  test scoring). Needs 2 or more GPUs: else one line says it was not measured.

Every timed stage is rebuilt from scratch (``force``), so rows never reuse each other's students.

Run: .venv/bin/python bench/gpu.py [--images 2000] [--batch-sizes 64,256] [--epochs 1]
     [--rows ceiling,stage,repdistiller,cache,ddp] [--device auto|cpu|cuda]
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402

from distill.kd import METHOD as KD_METHOD, soft_target_kl  # noqa: E402
from models.registry import build_model  # noqa: E402
from pipeline.backends.local import LocalBackend  # noqa: E402
from pipeline.logfiles import read_log  # noqa: E402
from pipeline.plan import Plan, StageSpec, build_plan  # noqa: E402
from pipeline.store import StageFolders  # noqa: E402
from runner import export_repo_path  # noqa: E402
from stages import StageJob, run_stage  # noqa: E402
from stages.context import StageRun, select_device  # noqa: E402
from tests.test_data import write_cifar100  # noqa: E402

TEACHER, STUDENT, NUM_CLASSES, IMAGE_SHAPE = "resnet32x4", "resnet8x4", 100, (3, 32, 32)
KD = {name: spec["default"] for name, spec in KD_METHOD["params"].items()}  # RepDistiller's -r 0.1 -a 0.9 --kd_T 4
ROWS = ("ceiling", "stage", "repdistiller", "cache", "same-images", "ddp")
SWITCHES = {"amp": True, "channels_last": True, "cudnn_benchmark": True}  # the stages keep them off on a CPU
CACHE_METHODS = ["kd", "dkd", "dist", "ckd", "kd+dist"]
STAGE_GOAL, REPDISTILLER_GOAL, CACHE_GOAL = 0.90, 3.0, 1.8
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)  # RepDistiller's dataset/cifar100.py


def _sweep(work: Path, name: str, methods: list[str], device: str, student: dict | None = None,
           teacher: dict | None = None, cache: bool = False, resources: dict | None = None) -> Plan:
    """The plan of a resnet32x4 -> resnet8x4 sweep over ``methods`` on the benchmark's CIFAR-100."""
    runtime = {"device": device, **SWITCHES}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "data_root": str(work / "data"),
        "axes": {"dataset": ["cifar100"], "pair": [f"{TEACHER}:{STUDENT}"], "method": methods, "seed": [0]},
        "defaults": {
            "data": {"val_fraction": 0.0},
            "teacher": {"epochs": 1, **runtime, **(teacher or {})}, "student": {**runtime, **(student or {})},
            "evaluate": runtime, "teacher_cache": {"enabled": cache, "dtype": "float16"},
        },
        "resources": {"default": {"cpus": torch.get_num_threads()}, **(resources or {})},
    }))
    return build_plan(path)


def _of_kind(plan: Plan, kind: str) -> list[StageSpec]:
    return [spec for spec in plan.stages.values() if spec.kind == kind]


def _train_teachers(plan: Plan, root: Path) -> None:
    """The teachers every student row needs, untimed; one already DONE under ``root`` is reused."""
    for spec in _of_kind(plan, "train_teacher"):
        run_stage(spec, root)


def _timed(stages: list[StageSpec], root: Path) -> float:
    started = time.perf_counter()
    for spec in stages:
        run_stage(spec, root, force=True)
    return time.perf_counter() - started


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warmup_steps(device: torch.device) -> int:
    return 3 if device.type == "cuda" else 1


def _models(device: torch.device) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    """(teacher in eval mode, student in train mode, the student's SGD), channels-last on CUDA."""
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    torch.manual_seed(0)
    teacher = build_model(TEACHER, NUM_CLASSES, IMAGE_SHAPE).to(device, memory_format=layout).eval().requires_grad_(False)
    student = build_model(STUDENT, NUM_CLASSES, IMAGE_SHAPE).to(device, memory_format=layout).train()
    return teacher, student, torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def ceiling_rate(batch_size: int, steps: int, device: torch.device) -> float:
    """Images/s of ``steps`` kd steps (teacher forward, student forward, loss, backward, SGD step) on one
    synthetic batch resident on ``device``, after warm-up steps."""
    cuda = device.type == "cuda"
    teacher, student, optimizer = _models(device)
    images = torch.randn((batch_size, *IMAGE_SHAPE), device=device)
    images = images.contiguous(memory_format=torch.channels_last) if cuda else images
    labels = torch.randint(NUM_CLASSES, (batch_size,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            with torch.no_grad():
                teacher_logits = teacher(images)
            student_logits = student(images)
            loss = (KD["ce_weight"] * F.cross_entropy(student_logits, labels)
                    + KD["kd_weight"] * soft_target_kl(student_logits, teacher_logits, KD["temperature"]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(_warmup_steps(device)):
        step()
    _synchronise(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronise(device)
    return batch_size * steps / (time.perf_counter() - started)


@contextmanager
def _epoch_ends() -> Iterator[list[float]]:
    """The clock at every ``StageRun.heartbeat`` of in-process stages: EpochLoop calls it once per epoch,
    after the epoch's steps and scoring (both read their results to the host, so a GPU is done) and
    before its checkpoint and log write; ``finish`` calls it once more."""
    ends: list[float] = []
    heartbeat = StageRun.heartbeat

    def timed(stage: StageRun) -> None:
        ends.append(time.perf_counter())
        heartbeat(stage)

    StageRun.heartbeat = timed
    try:
        yield ends
    finally:
        StageRun.heartbeat = heartbeat


def stage_rate(work: Path, images: int, batch_size: int, device: str) -> tuple[float, float]:
    """Images/s of a 2-epoch kd student stage's second epoch: (with epoch 1's checkpoint and log write,
    log.pkl's ``epoch_time_s`` alone)."""
    plan = _sweep(work, f"stage-{batch_size}", ["kd"], device, student={"epochs": 2, "batch_size": batch_size})
    root = work / "out"
    _train_teachers(plan, root)
    [student] = _of_kind(plan, "train_student")
    with _epoch_ends() as ends:
        _timed([student], root)
    second = read_log(StageFolders(root, student.name).logs)["epochs"][1]
    return images / (ends[1] - ends[0]), images / second["epoch_time_s"]


class _UncheckedCIFAR100(datasets.CIFAR100):
    """torchvision's CIFAR100 without its md5 checks, which name the official archive's files: the
    benchmark's files are in the official format with other pixels. Only the checks are skipped."""

    def _check_integrity(self) -> bool:
        return True

    def _load_meta(self) -> None:
        with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as file:
            self.classes = pickle.load(file, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """RepDistiller's DistillKL: summed KL of the softened distributions x T^2, over the batch size."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    p_teacher = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p_student, p_teacher, reduction="sum") * temperature**2 / student_logits.shape[0]


def repdistiller_rate(data_root: Path, batch_size: int, device: torch.device) -> float:
    """Images/s of one epoch of RepDistiller's kd loop, after its first batches (at most all but one)."""
    cuda = device.type == "cuda"
    augment = transforms.Compose([
        transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(CIFAR100_MEAN, CIFAR100_STD),
    ])
    dataset = _UncheckedCIFAR100(str(data_root), train=True, download=False, transform=augment)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=8 if cuda else min(8, os.cpu_count() or 1),
                        pin_memory=cuda)
    teacher, student, optimizer = _models(device)
    warmup = min(_warmup_steps(device), len(loader) - 1)
    meters: list[tuple[float, float]] = []
    seen, started = 0, time.perf_counter()
    for step, (images, labels) in enumerate(loader):
        if step == warmup:
            _synchronise(device)
            seen, started = 0, time.perf_counter()
        images = images.to(device, memory_format=torch.channels_last) if cuda else images.to(device)
        labels = labels.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            student_logits = student(images)
            with torch.no_grad():
                teacher_logits = teacher(images)
            loss = (KD["ce_weight"] * F.cross_entropy(student_logits, labels)
                    + KD["kd_weight"] * distill_kl(student_logits, teacher_logits, KD["temperature"]))
        top1 = (student_logits.argmax(dim=1) == labels).float().mean() * 100
        meters.append((loss.item(), top1.item()))  # its AverageMeters' reads: each waits for the device
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(labels)
    _synchronise(device)
    return seen / (time.perf_counter() - started)


def teacher_cache_ratio(work: Path, epochs: int, device: str) -> tuple[float, float, float]:
    """(students' seconds without the cache, with it (the cache stage included), the cache stage alone)."""
    root = work / "out"
    plain = _sweep(work, "plain", CACHE_METHODS, device, student={"epochs": epochs})
    cached = _sweep(work, "cached", CACHE_METHODS, device, student={"epochs": epochs}, cache=True)
    _train_teachers(plain, root)
    without = _timed(_of_kind(plain, "train_student"), root)
    outputs = _timed(_of_kind(cached, "teacher_outputs"), root)
    students = _timed(_of_kind(cached, "train_student"), root)
    return without, outputs + students, outputs


def ddp_rate(work: Path, images: int, batch_size: int, gpus: int) -> float:
    """Images/s of epoch 2 (log.pkl's ``epoch_time_s``) of a 2-epoch kd student stage on ``gpus`` ranks,
    one per GPU, each global batch shared among them, run by the local backend as ``submit`` runs it;
    its teacher trains beforehand in this process, not counted."""
    root = work / f"ddp-{gpus}"  # a root per rank count: the stage hash does not change with it
    plan = _sweep(work, f"ddp-{batch_size}-{gpus}", ["kd"], "cuda", student={"epochs": 2, "batch_size": batch_size},
                  resources={"train_student": {"gpus": gpus, "cpus": max(1, torch.get_num_threads() // gpus)}})
    _train_teachers(plan, root)
    [teacher], [student] = _of_kind(plan, "train_teacher"), _of_kind(plan, "train_student")
    export_repo_path()
    pair = dataclasses.replace(plan, stages={teacher.name: teacher, student.name: student})  # not its evaluation
    outcomes = LocalBackend(root, root / "jobs", StageJob(), 1).run(pair, {student.name: "not built"})
    if outcomes[-1].state != "done":
        raise RuntimeError(f"{student.name} on {gpus} GPU(s): {outcomes[-1].state}: {outcomes[-1].error}")
    return images / read_log(StageFolders(root, student.name).logs)["epochs"][1]["epoch_time_s"]


def same_images_on_gpu(data_root: Path, batch_size: int, device: torch.device) -> bool:
    """Whether epoch 0's training batches of the data resident on ``device`` equal the CPU's exactly."""
    from data.registry import load_dataset
    from pipeline.sweep_schema import SECTIONS
    from stages.loading import resident_data
    from stages.training import TrainingSettings, training_batches

    on_cpu = load_dataset("cifar100", str(data_root), 0.0, 0)
    on_gpu = resident_data(on_cpu, device)
    defaults = {key: field.default for key, field in SECTIONS["student"].items()}
    settings = TrainingSettings.from_settings({**defaults, "batch_size": batch_size, "augment": True}, seed=0)
    pairs = zip(training_batches(on_cpu, settings, 0), training_batches(on_gpu, settings, 0))
    return on_gpu.device.type == "cuda" and all(
        torch.equal(cpu_images, gpu_images.cpu()) and torch.equal(cpu_labels, gpu_labels.cpu())
        for (cpu_images, cpu_labels, _), (gpu_images, gpu_labels, _) in pairs)


def _driver() -> str:
    if shutil.which("nvidia-smi") is None:
        return "unknown (no nvidia-smi)"
    found = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True)
    return found.stdout.splitlines()[0].strip() if found.returncode == 0 and found.stdout.strip() else "unknown (nvidia-smi failed)"


def environment(device: torch.device) -> str:
    """The header: torch, the device, CUDA and driver where it is a GPU, CPU threads, date."""
    if device.type == "cuda":
        where = (f"{torch.cuda.get_device_name(device)} (x{torch.cuda.device_count()}), CUDA {torch.version.cuda}, "
                 f"driver {_driver()}")
    else:
        where = "no GPU: CPU only"
    return (f"torch {torch.__version__}, {where}, {os.cpu_count()} CPU threads (torch uses {torch.get_num_threads()}), "
            f"{datetime.now().astimezone().isoformat(timespec='minutes')}")


def _verdict(value: float, goal: float) -> str:
    return f"goal >= {goal:g}, {'met' if value >= goal else 'NOT met'}"


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers separated by commas, e.g. 64,256")
    return sizes


def _rows(text: str) -> list[str]:
    rows = text.split(",")
    unknown = [row for row in rows if row not in ROWS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown row(s) {', '.join(unknown)}; allowed: {', '.join(ROWS)}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="CIFAR-100 training images (default 2000)")
    parser.add_argument("--batch-sizes", type=_batch_sizes, default=[64, 256], help="default 64,256")
    parser.add_argument("--epochs", type=int, default=1, help="student epochs of the cache row (default 1)")
    parser.add_argument("--rows", type=_rows, default=list(ROWS), help=f"default {','.join(ROWS)}")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args()
    device = select_device(args.device)
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = cuda  # as the stages' cudnn_benchmark sets it for their process
    print(environment(device))
    print(f"{TEACHER} -> {STUDENT} kd, {args.images} images, "
          + ("bf16 autocast, channels_last and cudnn.benchmark on every row (RepDistiller itself trains float32 NCHW)"
             if cuda else "float32 on every row (the switches act on CUDA only)"))
    ceiling: dict[int, float] = {}
    stage: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        write_cifar100(work / "data", np.random.default_rng(0), train_count=args.images, test_count=args.images // 5)
        for row in [name for name in ROWS if name in args.rows]:
            if row == "cache":
                without, with_cache, outputs = teacher_cache_ratio(work, args.epochs, str(device))
                print(f"cache         batch  64: {len(CACHE_METHODS)} logit methods ({', '.join(CACHE_METHODS)}), "
                      f"{args.epochs} epoch(s): students {without:.1f} s without, {with_cache:.1f} s with (the "
                      f"teacher_outputs stage {outputs:.1f} s of it): {without / with_cache:.2f}x "
                      f"({_verdict(without / with_cache, CACHE_GOAL)})")
                continue
            if row == "same-images":
                if cuda:
                    same = same_images_on_gpu(work / "data", args.batch_sizes[0], device)
                    print(f"same-images   batch {args.batch_sizes[0]:3d}: the resident data's epoch on the GPU is the "
                          f"CPU's batch for batch: {'yes' if same else 'NO'}")
                else:
                    print("same-images: not checked: needs a GPU (this run is on the CPU)")
                continue
            if row == "ddp" and (not cuda or torch.cuda.device_count() < 2):
                print("ddp: not measured: needs several GPUs ("
                      + (f"this machine has {torch.cuda.device_count()})" if cuda else "this run is on the CPU)"))
                continue
            for batch_size in args.batch_sizes:
                line = f"{row:13s} batch {batch_size:3d}: "
                if row == "ceiling":
                    ceiling[batch_size] = ceiling_rate(batch_size, math.ceil(args.images / batch_size), device)
                    line += f"{ceiling[batch_size]:8.0f} images/s"
                elif row == "stage":
                    stage[batch_size], logged = stage_rate(work, args.images, batch_size, str(device))
                    line += f"{stage[batch_size]:8.0f} images/s (log.pkl's epoch_time_s alone: {logged:.0f})"
                    if batch_size in ceiling:
                        ratio = stage[batch_size] / ceiling[batch_size]
                        line += f"; {ratio:.2f} of the ceiling ({_verdict(ratio, STAGE_GOAL)})"
                elif row == "repdistiller":
                    theirs = repdistiller_rate(work / "data", batch_size, device)
                    line += f"{theirs:8.0f} images/s"
                    if batch_size in stage:
                        ratio = stage[batch_size] / theirs
                        line += f"; the stage {ratio:.2f}x it ({_verdict(ratio, REPDISTILLER_GOAL)})"
                else:
                    gpus = torch.cuda.device_count()
                    one, every = (ddp_rate(work, args.images, batch_size, count) for count in (1, gpus))
                    line += f"{one:8.0f} images/s on 1 GPU, {every:.0f} on {gpus}: {every / one:.2f}x"
                print(line, flush=True)


if __name__ == "__main__":
    main()
