"""Every method of the catalogue, and the compositions, trained end to end by ``runner.py submit`` (local backend).

Slow (a few minutes on 2 cores): run with ``python -m pytest -m slow``. ``tests/slurm`` submits the same sweep to Slurm.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.plan import build_plan
from tests.conftest import run_runner
from tests.every_method import every_method, write_every_method_sweep
from tests.every_method_checks import check_every_method_trained


@pytest.mark.slow
def test_every_method_trains_and_is_evaluated_from_one_sweep_on_the_local_backend(tmp_path: Path) -> None:
    sweep = write_every_method_sweep(tmp_path, "every-method-local")
    root = tmp_path / "out"
    result = run_runner("submit", str(sweep), "--root", str(root), cwd=tmp_path, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check_every_method_trained(build_plan(sweep), root)
    report = run_runner("report", str(sweep), "--root", str(root), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    for method in every_method():
        assert f" {method} " in report.stdout, method
