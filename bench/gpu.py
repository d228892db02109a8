"""The GPU path's figures (issue 9), on a GPU when there is one, on the CPU otherwise.

Implemented so far: the teacher cache. A sweep of five logit methods (kd, dkd, dist, ckd, kd+dist)
distils resnet32x4 into resnet8x4 on a CIFAR-100 in the official format; the students' total time
is measured twice, each student running its teacher, and with ``teacher_cache`` (one
``teacher_outputs`` stage, counted in, plus the five students reading its file). The goal is a
ratio >= 1.8: on a CPU the teacher forward is about 60% of a KD step, and every uncached student
pays it again. Stages run in this process one at a time (``stages.run_stage``), each timed by
wall clock; the teacher trains once beforehand and is not counted.

Still to come here (the issue's other rows): the resident-tensor ceiling, kdbench's stage epoch
against it, a RepDistiller-style DataLoader loop, and DDP on 1 vs all GPUs.

Run: .venv/bin/python bench/gpu.py [--images 2000] [--epochs 1] [--device auto|cpu|cuda]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from pipeline.plan import build_plan  # noqa: E402
from stages import run_stage  # noqa: E402
from tests.test_data import write_cifar100  # noqa: E402

METHODS = ["kd", "dkd", "dist", "ckd", "kd+dist"]
CACHE_GOAL = 1.8


def _sweep(work: Path, name: str, cache: bool, images: int, epochs: int, device: str) -> Path:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "data_root": str(work / "data"),
        "axes": {"dataset": ["cifar100"], "pair": ["resnet32x4:resnet8x4"], "method": METHODS, "seed": [0]},
        "defaults": {
            "data": {"val_fraction": 0.0},
            "teacher": {"epochs": 1, "device": device}, "student": {"epochs": epochs, "device": device},
            "evaluate": {"device": device},
            "teacher_cache": {"enabled": cache, "dtype": "float16"},
        },
        "resources": {"default": {"cpus": torch.get_num_threads()}},
    }))
    return path


def _timed(stages, root: Path) -> float:
    started = time.perf_counter()
    for spec in stages:
        run_stage(spec, root)
    return time.perf_counter() - started


def teacher_cache_ratio(work: Path, images: int, epochs: int, device: str) -> tuple[float, float, float]:
    """(students' seconds without the cache, with it (the cache stage included), the cache stage alone)."""
    write_cifar100(work / "data", np.random.default_rng(0), train_count=images, test_count=200)
    root = work / "out"
    plain = build_plan(_sweep(work, "plain", False, images, epochs, device))
    cached = build_plan(_sweep(work, "cached", True, images, epochs, device))
    _timed([spec for spec in plain.stages.values() if spec.kind == "train_teacher"], root)
    without = _timed([spec for spec in plain.stages.values() if spec.kind == "train_student"], root)
    outputs = _timed([spec for spec in cached.stages.values() if spec.kind == "teacher_outputs"], root)
    students = _timed([spec for spec in cached.stages.values() if spec.kind == "train_student"], root)
    return without, outputs + students, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="CIFAR-100 training images (default 2000)")
    parser.add_argument("--epochs", type=int, default=1, help="student epochs (default 1)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}; resnet32x4 -> resnet8x4, batch 64, {args.images} images, {args.epochs} epoch(s)")
    with tempfile.TemporaryDirectory() as temporary:
        without, with_cache, outputs = teacher_cache_ratio(Path(temporary), args.images, args.epochs, device)
    print(f"teacher cache, {len(METHODS)} logit methods ({', '.join(METHODS)}): students {without:.1f} s without, "
          f"{with_cache:.1f} s with (the teacher_outputs stage {outputs:.1f} s of it): "
          f"{without / with_cache:.2f}x (goal >= {CACHE_GOAL})")


if __name__ == "__main__":
    main()
