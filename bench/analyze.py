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

Run: .venv/bin/python bench/analyze.py [--samples 5000] [--cpus N]
"""
from __future__ import annotations

import argparse
import json
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
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
