"""How long planning a 1,000-experiment sweep takes, against the one-second budget of DESIGN.md.

Writes a sweep of 5 pairs x 4 methods x 5 seeds x 10 student learning rates over the real
catalogue to a temporary file, plans it a few times and prints the best time and its share of
the budget. Run: .venv/bin/python bench/plan.py
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.plan import build_plan  # noqa: E402  (needs the repository on sys.path)

BUDGET_S = 1.0
REPEATS = 5
SWEEP = {
    "name": "bench",
    "axes": {
        "dataset": ["cifar100"],
        "pair": ["resnet32x4:resnet8x4", "resnet56:resnet20", "resnet110:resnet20", "resnet110:resnet56", "resnet32x4:resnet20"],
        "method": ["vanilla", "kd", "ft", "tucker"],
        "seed": [0, 1, 2, 3, 4],
        "student.lr": [0.01 * step for step in range(1, 11)],
    },
    "defaults": {"methods": {"ft": {"paraphraser_epochs": 30}}},
}


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.yaml"
        path.write_text(yaml.safe_dump(SWEEP))
        timings = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            plan = build_plan(path)
            timings.append(time.perf_counter() - start)
    best = min(timings)
    print(f"planned {len(plan.experiments)} experiments into {len(plan.stages)} stages in {best:.3f} s "
          f"(best of {REPEATS}); {best / BUDGET_S:.2f} x the {BUDGET_S:.0f} s budget; torch imported: {'torch' in sys.modules}")


if __name__ == "__main__":
    main()
