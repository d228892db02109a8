"""How long planning a 1,000-experiment sweep takes, against the one-second budget of DESIGN.md.

Writes a sweep of 5 pairs x 4 methods x 5 seeds x 10 student learning rates over the real
catalogue to a temporary file and plans it a few times: once without a data_root (the
fingerprint is a placeholder), once with a data_root holding CIFAR-100 member files of the real
sizes (the fingerprint comes from the cache beside them). Prints the best times and their share
of the budget, and the one-off cost of hashing the files when the cache does not know them.
Run: .venv/bin/python bench/plan.py
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import files  # noqa: E402  (needs the repository on sys.path)
from pipeline.plan import build_plan  # noqa: E402

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
MEMBER_SIZES = {"train": 155_000_000, "test": 31_000_000, "meta": 1_500}
"""About the sizes of the official cifar-100-python/ members; their bytes do not matter here."""


def write_members(root: Path) -> None:
    """Member files of the real sizes, dated a minute back so the fingerprint cache keeps them."""
    folder = root / files.CIFAR_LAYOUTS["cifar100"].folder
    folder.mkdir(parents=True)
    block = os.urandom(1 << 20)
    minute_ago = time.time_ns() - 60 * 10**9
    for member, size in MEMBER_SIZES.items():
        with (folder / member).open("wb") as stream:
            for start in range(0, size, len(block)):
                stream.write(block[: min(len(block), size - start)])
        os.utime(folder / member, ns=(minute_ago, minute_ago))


def best_plan_time(path: Path) -> tuple[float, int, int]:
    timings = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        plan = build_plan(path)
        timings.append(time.perf_counter() - start)
    return min(timings), len(plan.experiments), len(plan.stages)


def main() -> None:
    os.environ.pop("KDBENCH_DATA", None)
    with tempfile.TemporaryDirectory() as folder:
        without_root, with_root, data = Path(folder) / "bench.yaml", Path(folder) / "bench_data.yaml", Path(folder) / "data"
        without_root.write_text(yaml.safe_dump(SWEEP))
        with_root.write_text(yaml.safe_dump({**SWEEP, "data_root": str(data)}))
        write_members(data)
        start = time.perf_counter()
        files.fingerprint("cifar100", str(data))
        cold = time.perf_counter() - start
        rows = [("no data_root", *best_plan_time(without_root)), ("data_root, cache warm", *best_plan_time(with_root))]
    for label, best, experiments, stages in rows:
        print(f"{label}: planned {experiments} experiments into {stages} stages in {best:.3f} s (best of {REPEATS}); "
              f"{best / BUDGET_S:.2f} x the {BUDGET_S:.0f} s budget")
    megabytes = sum(MEMBER_SIZES.values()) / 1e6
    print(f"fingerprint with a cold cache (once per change of the files): {cold:.2f} s for {megabytes:.0f} MB; "
          f"torch imported: {'torch' in sys.modules}")


if __name__ == "__main__":
    main()
