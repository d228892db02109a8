"""The sweep report: mean ± std on hand numbers, ordering, pending rows, and the three files."""
from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest
from matplotlib.container import BarContainer

from pipeline.report import aggregate, report_figure, to_csv, to_markdown, write_report

PAIR = {"dataset": "cifar100", "teacher": "resnet56", "student": "resnet20"}


def row(method: str, seed: int, top1: float | None, role: str = "student", **fields: Any) -> dict[str, Any]:
    """A row as the integrator builds it; ``top1=None`` stands for a stage that has not finished."""
    result = {} if top1 is None else {
        "top1_last": top1 - 0.5, "top1_best_val": top1, "top5_best_val": top1 + 15.0,
        "agreement_best_val": None if role == "teacher" else 90.0, "parameters": 278_324,
    }
    return {**PAIR, "method": method, "seed": seed, "role": role, **result, **fields}


def sweep() -> list[dict[str, Any]]:
    return [
        row("kd", 0, 80.0),
        row("kd", 1, 82.0),
        row("fitnet", 0, 79.0),
        row("fitnet", 1, None),
        row("at", 0, None),
        row("vanilla", 0, 78.0),
        row("teacher", 0, 84.0, role="teacher", parameters=861_620),
    ]


def test_mean_and_sample_std_over_seeds() -> None:
    kd = next(line for line in aggregate(sweep()) if line.method == "kd")
    assert (kd.seeds, kd.pending) == (2, 0)
    assert str(kd.metrics["top1_best_val"]) == "81.00 ± 1.41"
    assert str(kd.metrics["top1_last"]) == "80.50 ± 1.41"


def test_order_is_teacher_vanilla_then_alphabetical() -> None:
    assert [line.method for line in aggregate(sweep())] == ["teacher", "vanilla", "at", "fitnet", "kd"]


def test_pairs_keep_the_order_they_first_appear_in() -> None:
    other = {"dataset": "cifar100", "teacher": "resnet110", "student": "resnet20"}
    rows = [{**row("kd", 0, 70.0), **other}, *sweep()]
    assert [(line.teacher, line.method) for line in aggregate(rows)][:2] == [("resnet110", "kd"), ("resnet56", "teacher")]


def test_unfinished_stages_show_as_pending() -> None:
    table = aggregate(sweep())
    fitnet, at = (next(line for line in table if line.method == name) for name in ("fitnet", "at"))
    assert (fitnet.seeds, fitnet.pending, str(fitnet.metrics["top1_best_val"])) == (1, 1, "79.00")
    assert (at.seeds, at.pending, at.metrics["top1_best_val"]) == (0, 1, None)


def test_markdown_shows_each_group_and_pending_cells() -> None:
    lines = to_markdown(aggregate(sweep())).splitlines()
    table = [line for line in lines if line.startswith("| cifar100")]
    assert table[0] == "| cifar100 | resnet56 → resnet20 | teacher | 1 | 83.50 | 84.00 | 99.00 | - | 861,620 | 72.34 | +11.16 |"
    assert table[2] == "| cifar100 | resnet56 → resnet20 | at | 0 (+1 pending) | pending | pending | pending | pending | - | 70.55 | - |"
    assert "| fitnet | 1 (+1 pending) | 78.50 | 79.00 |" in table[3]
    assert "| kd | 2 | 80.50 ± 1.41 | 81.00 ± 1.41 | 96.00 ± 1.41 | 90.00 ± 0.00 | 278,324 |" in table[4]


def test_csv_has_numbers_and_empty_cells_for_absent_values() -> None:
    records = list(csv.DictReader(io.StringIO(to_csv(aggregate(sweep())))))
    assert [record["method"] for record in records] == ["teacher", "vanilla", "at", "fitnet", "kd"]
    kd = records[-1]
    assert float(kd["top1_best_val_mean"]) == 81.0
    assert float(kd["top1_best_val_std"]) == pytest.approx(1.4142, abs=1e-4)
    assert (kd["n"], kd["pending"], kd["parameters"]) == ("2", "0", "278324")
    assert records[0]["top1_best_val_std"] == "" and records[0]["agreement_best_val_mean"] == ""
    assert records[2]["top1_best_val_mean"] == ""


def test_report_figure_has_a_bar_per_method_at_its_mean() -> None:
    axes = report_figure(aggregate(sweep())).axes[0]
    bars = {container.get_label(): container for container in axes.containers if isinstance(container, BarContainer)}
    assert list(bars) == ["teacher", "vanilla", "at", "fitnet", "kd"]
    assert bars["kd"].patches[0].get_height() == 81.0


def test_write_report_writes_three_files_atomically(tmp_path: Path) -> None:
    written = write_report(aggregate(sweep()), tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["report.csv", "report.md", "report.png"]
    assert sorted(written) == sorted(tmp_path.iterdir())
    assert matplotlib.image.imread(tmp_path / "report.png").ndim == 3
    assert (tmp_path / "report.md").read_text() == to_markdown(aggregate(sweep()))


def test_empty_sweep_still_writes_a_report(tmp_path: Path) -> None:
    assert len(write_report(aggregate([]), tmp_path)) == 3


def test_a_seed_twice_in_one_group_is_refused() -> None:
    with pytest.raises(ValueError, match="seed 0 of kd .* appears twice"):
        aggregate([row("kd", 0, 80.0), row("kd", 0, 81.0)])


def test_row_without_a_key_is_named() -> None:
    incomplete = row("kd", 0, 80.0)
    del incomplete["seed"]
    with pytest.raises(ValueError, match="report row 0: missing key 'seed'"):
        aggregate([incomplete])


def test_unknown_role_is_refused() -> None:
    with pytest.raises(ValueError, match="role 'pupil' is not one of teacher, student"):
        aggregate([row("kd", 0, 80.0, role="pupil")])


def test_read_side_never_imports_torch() -> None:
    code = "import sys, pipeline.logfiles, pipeline.plots, pipeline.report; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)
