"""The demo's promise, checked on its real output: a clear teacher, and students far above chance.

Slow (about 5 minutes on 2 cores): run with ``python -m pytest -m slow``.
"""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHANCE = 10.0  # digits has 10 classes


@pytest.mark.slow
def test_demo_finishes_with_a_clear_teacher_and_students_far_above_chance(tmp_path: Path) -> None:
    finished = subprocess.run(
        [sys.executable, str(REPO / "runner.py"), "demo", "--root", str(tmp_path)],
        capture_output=True, text=True, timeout=1200,
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "| teacher |" in finished.stdout

    with open(tmp_path / "logs" / "report-demo" / "report.csv", newline="") as stream:
        rows = {row["method"]: row for row in csv.DictReader(stream)}
    assert set(rows) == {"teacher", "vanilla", "kd", "ft", "tucker"}
    assert all(rows[method]["n"] == "2" for method in ("vanilla", "kd", "ft", "tucker"))
    teacher = float(rows["teacher"]["top1_last_mean"])
    vanilla = float(rows["vanilla"]["top1_last_mean"])
    assert teacher >= vanilla + 2.0, (teacher, vanilla)
    for method in ("vanilla", "kd", "ft", "tucker"):
        assert float(rows[method]["top1_last_mean"]) > 8 * CHANCE, rows[method]
    # analysis is on in the demo: one analyze stage per trained model, read back by report
    report = (tmp_path / "logs" / "report-demo" / "report.md").read_text()
    assert "## Layer quality of the teachers" in report and "## Feature statistics, student − teacher" in report
    analyses = sorted((tmp_path / "logs").glob("analyze-*"))
    assert len(analyses) == 9, analyses  # the teacher and 8 students
    assert all((folder / "DONE").is_file() and (folder / "Layers.png").is_file() for folder in analyses)
    quality = subprocess.run(
        [sys.executable, str(REPO / "runner.py"), "layers-quality", str(REPO / "configs" / "demo.yaml"), "--root", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert quality.returncode == 0 and "teacher_taps: [" in quality.stdout, quality.stdout + quality.stderr
