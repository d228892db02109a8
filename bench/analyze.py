"""Seconds and peak memory of one analyze stage: resnet32x4, every generalised layer, 5,000 CIFAR images.

The model is a resnet32x4 teacher imported from a checkpoint of freshly initialised weights
(``epochs: 0``): what is measured is the work, which does not depend on what the weights learnt.
The data set is CIFAR-100 in its official on-disk format (random images, 60 per class, no
validation hold-out), and the stage analyses one split, the training split's 5,000-image
class-balanced sample, with statistics and geometry on. It runs in its own process, which reports
its peak resident memory (VmHWM) and the stage's own split of the time (forward passes,
statistics, geometry, the figures' arrays) from analysis.json.

Goal on the 2-core CPU machine: under 5 minutes and 4 GB, by one forward pass whose features go to
temporary files tap by tap, analysed one tap at a time, instead of holding every layer's features
(about 12 GB here) at once.

With ``--tap C,H,W`` it measures instead the analysis of one tap that large (5,000 samples of
64,80,80 is resnet18's first map on 160-px Imagenette: 8.2 GB, 7.6 GiB, of float32), from a file of random
post-ReLU values written as the stage writes them (channel-major): the stage reads a tap a few
channels at a time, so its peak memory should stay far under the tap's size.

Run: .venv/bin/python bench/analyze.py [--samples 5000] [--cpus N] [--tap C,H,W]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from models.registry import build_model  # noqa: E402
from pipeline.plan import build_plan  # noqa: E402
from pipeline.store import StageFolders  # noqa: E402
from stages import run_stage  # noqa: E402
from tests.test_data import write_cifar100  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GOAL_SECONDS, GOAL_GB = 300, 4.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tap", help="C,H,W: time one tap of this shape alone, from a random file")
    args = parser.parse_args()
    if args.tap:
        large_tap(args.samples, tuple(int(side) for side in args.tap.split(",")))
        return
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        per_class = -(-args.samples // 100)
        write_cifar100(work / "data", np.random.default_rng(0), train_count=100 * per_class, test_count=100)
        checkpoint = work / "resnet32x4.pt"
        torch.manual_seed(0)
        torch.save(build_model("resnet32x4", 100, (3, 32, 32)).state_dict(), checkpoint)
        sweep = work / "analyze.yaml"
        sweep.write_text(yaml.safe_dump({
            "name": "bench-analyze", "data_root": str(work / "data"),
            "axes": {"dataset": ["cifar100"], "pair": ["resnet32x4:resnet8x4"], "method": ["vanilla"]},
            "defaults": {
                "data": {"val_fraction": 0.0},
                "teacher": {"epochs": 0, "init": {"checkpoint": str(checkpoint)}},
                "analysis": {"stats": True, "geometry": True, "models": ["teacher"], "splits": ["train"],
                             "samples": args.samples},
            },
            "resources": {"default": {"cpus": args.cpus}},
        }))
        plan = build_plan(sweep)
        teacher = next(spec for spec in plan.stages.values() if spec.kind == "train_teacher")
        analyze = next(spec for spec in plan.stages.values() if spec.kind == "analyze")
        run_stage(teacher, work / "out")
        code = ("import json, sys; from stages import run_stage; run_stage(json.loads(sys.argv[1]), sys.argv[2]); "
                "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')))")
        started = time.perf_counter()
        finished = subprocess.run([sys.executable, "-c", code, json.dumps(analyze.to_dict()), str(work / "out")],
                                  check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                                  capture_output=True, text=True)
        wall = time.perf_counter() - started
        peak_gb = int(finished.stdout.split()[-1]) / 1024**2  # kB
        numbers = json.loads(StageFolders(work / "out", analyze.name).analysis_numbers.read_text())
    part = numbers["splits"]["train"]
    split = ", ".join(f"{key} {value:.0f} s" for key, value in numbers["seconds"].items())
    print(f"torch {torch.__version__}, {args.cpus} cpus; resnet32x4, {len(numbers['taps'])} taps, "
          f"{part['samples']:,} images")
    print(f"analyze stage: {wall:.0f} s ({wall / GOAL_SECONDS:.2f} of the {GOAL_SECONDS} s goal; {split}), "
          f"peak RSS {peak_gb:.2f} GB ({peak_gb / GOAL_GB:.2f} of the {GOAL_GB:g} GB goal)")


def large_tap(samples: int, shape: tuple[int, ...]) -> None:
    """Seconds and peak RSS of ``analyse_tap`` on one (samples, *shape) tap, in its own process."""
    code = """
import json, sys, time
from pathlib import Path
import numpy as np
from stages.analyze import LEGACY_SWITCHES, _TapFile, analyse_tap
samples, shape, path = int(sys.argv[1]), tuple(json.loads(sys.argv[2])), Path(sys.argv[3])
generator = np.random.default_rng(0)
with open(path, "wb") as out:
    for _ in range(shape[0]):
        np.maximum(generator.standard_normal((samples, *shape[1:]), dtype=np.float32), 0).tofile(out)
settings = {"analysis": {"stats": True, "geometry": True, "seed": 0, **dict.fromkeys(LEGACY_SWITCHES, False)}}
seconds = dict.fromkeys(("forward", "stats", "geometry", "arrays"), 0.0)
started = time.perf_counter()
analyse_tap(_TapFile(path, samples, shape), (0.0, 6.0), np.arange(samples) % 100, settings, 50_000, seconds)
seconds["all"] = time.perf_counter() - started
status = open("/proc/self/status").read()
print(json.dumps(seconds), next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
"""
    with tempfile.TemporaryDirectory() as temporary:
        path = Path(temporary) / "tap.f32"
        finished = subprocess.run([sys.executable, "-c", code, str(samples), json.dumps(shape), str(path)], check=True,
                                  cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    numbers, peak = finished.stdout.split()[:-1], finished.stdout.split()[-1]
    seconds = json.loads(" ".join(numbers))
    tap_gb, peak_gb = 4 * samples * math.prod(shape) / 1024**3, int(peak) / 1024**2  # GiB, as VmHWM
    split = ", ".join(f"{key} {value:.0f} s" for key, value in seconds.items() if key != "all")
    print(f"one {'x'.join(map(str, shape))} tap of {samples:,} samples ({tap_gb:.1f} GB of float32): analysed in "
          f"{seconds['all']:.0f} s ({split}; reading counts as forward), peak RSS {peak_gb:.2f} GB "
          f"({peak_gb / tap_gb:.2f} of the tap, {peak_gb / GOAL_GB:.2f} of the {GOAL_GB:g} GB goal)")


if __name__ == "__main__":
    main()
