"""How long ``runner.py submit`` of a sweep whose every stage is DONE takes, against the 1 s goal.

Plans a 208-experiment digits sweep (4 teachers x 4 methods x 13 seeds), leaves every
stage folder DONE with a verified record over real small files (what a finished sweep looks like,
without training it), then times ``runner.py submit`` in fresh processes. Prints the best and
median times, their share of the 1 s goal, and the ratio to a bare ``import torch`` (which the
no-op path must not pay). Run: .venv/bin/python bench/noop_submit.py
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.plan import build_plan  # noqa: E402
from pipeline.store import StageFolders, write_atomic, write_json  # noqa: E402

GOAL_S = 1.0
REPEATS = 5
SWEEP = {
    "name": "bench-noop",
    "axes": {
        "dataset": ["digits"],
        "pair": ["resnet20:resnet8x0.25", "resnet56:resnet8x0.25", "resnet110:resnet8x0.25", "resnet32x4:resnet8x0.25"],
        "method": ["vanilla", "kd", "ft", "tucker"],
        "seed": list(range(13)),
    },
    "defaults": {"methods": {"ft": {"paraphraser_epochs": 1}}},
}


def finished_tree(sweep: Path, root: Path) -> int:
    """Every stage of the sweep's plan DONE, each with a config, a log and a 64 kB weights file."""
    plan = build_plan(sweep)
    for name, spec in plan.stages.items():  # plan order: upstream DONE records exist first
        folders = StageFolders(root, name)
        write_json(folders.config, spec.to_dict())
        write_atomic(folders.log, b"log")
        write_atomic(folders.final_weights, bytes(65536))
        folders.mark_done([folders.config, folders.log, folders.final_weights], upstream=spec.upstream.values())
    return len(plan.stages)


def best_and_median(argv: list[str]) -> tuple[float, float]:
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return min(times), statistics.median(times)


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        sweep = Path(folder) / "sweep.yaml"
        sweep.write_text(yaml.safe_dump(SWEEP))
        stages = finished_tree(sweep, Path(folder) / "out")
        submit = best_and_median([sys.executable, str(REPO / "runner.py"), "submit", str(sweep), "--root", str(Path(folder) / "out")])
        torch = best_and_median([sys.executable, "-c", "import torch"])
    print(f"no-op submit of {stages} DONE stages: best {submit[0]:.2f} s, median {submit[1]:.2f} s "
          f"({submit[0] / GOAL_S:.0%} of the {GOAL_S:.0f} s goal)")
    print(f"bare 'import torch': best {torch[0]:.2f} s; no-op submit / import torch = {submit[0] / torch[0]:.2f}")


if __name__ == "__main__":
    main()
