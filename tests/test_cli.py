"""runner.py as a user meets it: help, refusing a bad sweep before touching disk, and the read commands.

The read commands run against one tiny sweep submitted once for the whole session (``tiny_submitted``).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import matplotlib.image
import pytest

import runner
from pipeline.catalogue import load_catalogue
from pipeline.plan import build_plan
from pipeline.store import StageFolders
from tests.conftest import PNG_SIGNATURE, REPO, SweepRun, run_runner, stage_name, write_sweep

COMMANDS = ("plan", "submit", "stage", "invalidate", "status", "cancel", "logs", "plot", "report", "demo")


# 9. A bad sweep is refused before anything is written ---------------------------------------------------

def test_bad_sweep_is_one_error_line_and_writes_nothing(tmp_path: Path) -> None:
    name = "bad-method-cli-test"
    sweep = write_sweep(tmp_path / "bad.yaml", {"name": name, "axes.method": ["vanilla", "kdd"]})
    allowed = ", ".join(sorted(load_catalogue().methods))

    for command in (["plan", str(sweep)], ["submit", str(sweep), "--root", str(tmp_path / "out")]):
        result = run_runner(*command, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert result.stdout == ""
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
        assert f"{sweep}: axes.method[1]: unknown method 'kdd'" in result.stderr
        assert result.stderr.rstrip().endswith(f"allowed: {allowed}")

    assert sorted(path.name for path in tmp_path.iterdir()) == ["bad.yaml"]
    assert not (REPO / "jobs" / name).exists()


def test_tucker_rank_larger_than_the_tensor_is_refused_before_submitting(tmp_path: Path) -> None:
    # resnet8x0.25's layer3 on 8x8 digits is (16, 2, 2) (projected to the teacher's 64 channels): h-rank 3 cannot fit.
    sweep = write_sweep(tmp_path / "rank.yaml", {"axes.method": ["vanilla", "tucker"], "defaults.methods": {"tucker": {"ranks": [4, 3, 2]}}})
    result = run_runner("submit", str(sweep), "--root", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: {sweep}: methods.tucker.ranks: "), result.stderr
    assert "resnet20:resnet8x0.25" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing submitted, not even the vanilla student


# 10. Help -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_exits_zero(command: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        runner.main([command, "--help"] if command else ["--help"])
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    if command is None:
        assert all(name in shown for name in COMMANDS)
    else:
        assert shown.startswith(f"usage: runner.py {command}") and "example: python runner.py" in shown


# 11. plot and report --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argument", ["folder", "log.pkl"])
def test_plot_redraws_from_log_alone(
    tiny_submitted: SweepRun, tmp_path: Path, argument: str, capsys: pytest.CaptureFixture[str]
) -> None:
    student = StageFolders(tiny_submitted.root, stage_name(tiny_submitted.plan, "student_stage"))
    folder = tmp_path / student.name
    folder.mkdir()
    shutil.copy(student.log, folder / "log.pkl")

    assert runner.main(["plot", str(folder if argument == "folder" else folder / "log.pkl")]) == 0
    assert capsys.readouterr().out.split() == [str(folder / "Loss.png"), str(folder / "Accuracy.png")]
    assert sorted(path.name for path in folder.iterdir()) == ["Accuracy.png", "Loss.png", "log.pkl"]
    for png in ("Loss.png", "Accuracy.png"):
        assert (folder / png).read_bytes().startswith(PNG_SIGNATURE)
        assert matplotlib.image.imread(folder / png).ndim == 3


def test_report_has_teacher_and_each_method(tiny_submitted: SweepRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, plan = tiny_submitted.root, tiny_submitted.plan
    out = tmp_path / "report"
    assert runner.main(["report", str(tiny_submitted.sweep), "--root", str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = {line.split("|")[3].strip(): line for line in printed.splitlines() if line.startswith("| digits |")}
    assert list(rows) == ["teacher", "vanilla", "kd"]
    for method, field in (("teacher", "teacher_evaluate_stage"), ("vanilla", "evaluate_stage"), ("kd", "evaluate_stage")):
        result = json.loads(StageFolders(root, stage_name(plan, field, "kd" if method == "teacher" else method)).result.read_text())
        assert f"| {result['top1_best_val']:.2f} |" in rows[method]
        assert "resnet20 → resnet8x0.25" in rows[method]

    assert sorted(path.name for path in out.iterdir()) == ["report.csv", "report.md", "report.png"]
    assert (out / "report.md").read_text() in printed
    with open(out / "report.csv") as stream:
        assert [row["method"] for row in csv.DictReader(stream)] == ["teacher", "vanilla", "kd"]
    assert (out / "report.png").read_bytes().startswith(PNG_SIGNATURE)


def test_logs_marks_the_best_epoch(tiny_submitted: SweepRun, capsys: pytest.CaptureFixture[str]) -> None:
    folder = StageFolders(tiny_submitted.root, stage_name(tiny_submitted.plan, "student_stage")).logs
    assert runner.main(["logs", str(folder)]) == 0
    shown = capsys.readouterr().out
    header, *epochs = shown.split("\n\n")[0].splitlines()
    assert header.split()[:4] == ["epoch", "train", "loss", "ce"] and "kd" in header.split()
    assert len(epochs) == 2 and sum(line.split()[0].endswith("*") for line in epochs) == 1
    assert "status: done" in shown and "best epoch (on validation)" in shown


# 12. The read commands never import torch -------------------------------------------------------------------

def test_read_commands_do_not_import_torch(tiny_submitted: SweepRun, tmp_path: Path) -> None:
    folders = [str(StageFolders(tiny_submitted.root, name).logs) for name in tiny_submitted.plan.stages]
    plot_folder = tmp_path / "plot"
    plot_folder.mkdir()
    shutil.copy(StageFolders(tiny_submitted.root, stage_name(tiny_submitted.plan, "student_stage")).log, plot_folder)
    commands = [
        ["plan", str(tiny_submitted.sweep)],
        ["logs", *folders],  # every stage kind's log.pkl unpickles without torch
        ["plot", str(plot_folder)],
        ["report", str(tiny_submitted.sweep), "--root", str(tiny_submitted.root), "--out", str(tmp_path / "report")],
        ["logs", str(tmp_path / "missing")],  # the error path too
    ]
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        import runner
        codes = [runner.main(command) for command in {commands!r}]
        assert codes == [0, 0, 0, 0, 2], codes
        loaded = sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "tensorly", "submitit", "stages"))
        assert not loaded, loaded
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_report_keeps_teacher_and_method_ablations_apart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    axes = {"dataset": ["digits"], "pair": ["resnet20:resnet8x0.25"], "method": ["vanilla", "kd"], "seed": [0],
            "teacher.lr": [0.05, 0.1], "methods.kd.temperature": [2, 4]}
    sweep = write_sweep(tmp_path / "ablate.yaml", {"axes": axes})
    assert runner.main(["report", str(sweep), "--root", str(tmp_path / "out")]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| digits")]
    labels = [(cells[2].strip(), cells[3].strip()) for cells in (row.split("|") for row in rows)]
    assert labels == [
        (pair, method)
        for pair in ("resnet20 [teacher.lr=0.05] → resnet8x0.25", "resnet20 [teacher.lr=0.1] → resnet8x0.25")
        for method in ("teacher", "vanilla", "kd methods.kd.temperature=2.0", "kd methods.kd.temperature=4.0")
    ]  # vanilla once per teacher: the kd temperature does not reach it


def test_a_data_set_without_a_data_root_is_refused_before_submitting(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path / "cifar.yaml", {"axes.dataset": ["cifar10"]})
    environment_had = os.environ.pop("KDBENCH_DATA", None)
    try:
        result = run_runner("submit", str(sweep), "--root", str(tmp_path / "out"), cwd=tmp_path)
    finally:
        if environment_had is not None:
            os.environ["KDBENCH_DATA"] = environment_had
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {sweep}: data_root: data set cifar10 reads files"), result.stderr
    assert not (tmp_path / "out").exists()


def test_the_readme_sweep_example_is_a_valid_sweep(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    example = readme.split("## The sweep file", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    sweep = tmp_path / "readme.yaml"
    sweep.write_text(example)
    plan = build_plan(sweep)
    assert len(plan.experiments) == 16  # 1 pair x 4 methods x 2 seeds x 2 student learning rates
