"""Every method of the catalogue, and the compositions, trained end to end through the local Slurm cluster."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pipeline.plan import build_plan
from tests.every_method import write_every_method_sweep
from tests.every_method_checks import check_every_method_trained

REPO = Path(__file__).resolve().parents[2]


def test_every_method_trains_and_is_evaluated_from_one_sweep_on_slurm(slurm_cluster, tmp_path: Path) -> None:
    sweep = write_every_method_sweep(tmp_path, "every-method-slurm", {"default": {"cpus": 1, "mem_gb": 1, "time_min": 20}})
    root = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(REPO / "runner.py"), "submit", str(sweep), "--backend", "slurm", "--wait", "--root", str(root)],
        capture_output=True, text=True, timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    plan = build_plan(sweep)
    results = check_every_method_trained(plan, root)
    assert set(results) == {experiment.method for experiment in plan.experiments}
