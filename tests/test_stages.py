"""The stages on real data: what a finished stage leaves, resuming after kill -9, and the one-line errors.

Each test runs the tiny sweep (or one stage of it) for real; none mocks the training loop, except
where a NaN must appear at a chosen epoch.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib.image
import pytest
import torch

import runner
from pipeline.logfiles import LogError, read_log
from pipeline.manifest import Manifest, submit_lock
from pipeline.plan import build_plan
from pipeline.store import CorruptFileError, StageFolders
from stages import run_stage
from stages.distributed import Ranks
from stages.files import StageError
from stages.training import NonFiniteLossError
from tests.conftest import PNG_SIGNATURE, REPO, RUNNER, SweepRun, copy_stage, run_runner, stage_name, temporary_files, write_sweep

pytestmark = pytest.mark.usefixtures("restore_torch_threads")

TERMS = {"train_teacher": ["ce"], "vanilla": ["ce"], "kd": ["ce", "kd"]}
RESULT_KEYS = ("top1_last", "top1_best_val", "top5_last", "top5_best_val", "test_loss_last", "test_loss_best_val",
               "agreement_last", "agreement_best_val", "parameters", "best_epoch")


def first_argmax(values: list[float]) -> int:
    return values.index(max(values))


def one_line(message: str) -> str:
    assert "\n" not in message.strip(), message
    return message


# 1. End to end, in-process ---------------------------------------------------------------------------

def test_every_stage_is_done_with_its_files(tiny_in_process: SweepRun) -> None:
    for name, spec in tiny_in_process.plan.stages.items():
        folders = StageFolders(tiny_in_process.root, name)
        assert folders.is_done(), name
        assert json.loads(folders.config.read_text()) == spec.to_dict()
        if spec.kind == "evaluate":
            assert folders.result.is_file(), name
        else:
            assert folders.final_weights.is_file() and folders.best_weights.is_file(), name
            for png in (folders.logs / "Loss.png", folders.logs / "Accuracy.png"):
                assert png.read_bytes().startswith(PNG_SIGNATURE), png
                assert matplotlib.image.imread(png).ndim == 3
    assert temporary_files(tiny_in_process.root) == []


@pytest.mark.parametrize("method", ["teacher", "vanilla", "kd"])
def test_training_log_has_every_epoch_and_named_terms(tiny_in_process: SweepRun, method: str) -> None:
    plan = tiny_in_process.plan
    name = stage_name(plan, "teacher_stage") if method == "teacher" else stage_name(plan, "student_stage", method)
    log = read_log(StageFolders(tiny_in_process.root, name).logs)
    assert log["status"] == "done"
    assert [entry["epoch"] for entry in log["epochs"]] == [1, 2]
    for entry in log["epochs"]:
        assert list(entry["terms"]) == TERMS["train_teacher" if method == "teacher" else method]
        assert entry["train_loss"] == pytest.approx(sum(entry["terms"].values()))
        assert all(math.isfinite(value) for value in entry["terms"].values())
        assert entry["lr"] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * (entry["epoch"] - 1) / 2)))
    val_acc = [entry["val_acc"] for entry in log["epochs"]]
    assert log["best_epoch"] == first_argmax(val_acc) + 1


@pytest.mark.parametrize("method", ["teacher", "vanilla", "kd"])
def test_result_is_scored_at_the_epoch_chosen_on_validation(tiny_in_process: SweepRun, method: str) -> None:
    plan, root = tiny_in_process.plan, tiny_in_process.root
    evaluate = stage_name(plan, "teacher_evaluate_stage") if method == "teacher" else stage_name(plan, "evaluate_stage", method)
    result = json.loads(StageFolders(root, evaluate).result.read_text())
    assert set(RESULT_KEYS) <= set(result)
    model_log = read_log(StageFolders(root, result["model_stage"]).logs)
    val_acc = [entry["val_acc"] for entry in model_log["epochs"]]
    assert result["best_epoch"] == first_argmax(val_acc) + 1 == model_log["best_epoch"]
    assert result["parameters"] > 0 and result["test_images"] > 0
    for key in ("top1_last", "top1_best_val", "top5_last", "top5_best_val"):
        assert 0.0 <= result[key] <= 100.0
    assert result["top5_best_val"] >= result["top1_best_val"]
    # The last epoch's test accuracy, logged during training, is what evaluate scores final.pt at.
    assert result["top1_last"] == pytest.approx(model_log["epochs"][-1]["test_acc"], abs=1e-3)
    if result["best_epoch"] == len(model_log["epochs"]):
        assert result["top1_best_val"] == result["top1_last"]
    if method == "teacher":
        assert result["agreement_last"] is None and result["teacher_top1"] is None
    else:
        teacher = json.loads(StageFolders(root, stage_name(plan, "teacher_evaluate_stage")).result.read_text())
        assert result["teacher_top1"] == pytest.approx(teacher["top1_last"])
        assert 0.0 <= result["agreement_best_val"] <= 100.0


# 2. kill -9 and resume --------------------------------------------------------------------------------

def test_kill_9_mid_training_then_resume_runs_each_epoch_once(tmp_path: Path) -> None:
    epochs = 6
    sweep = write_sweep(tmp_path / "tiny.yaml", {"defaults.teacher.epochs": epochs})
    root = tmp_path / "out"
    teacher = stage_name(build_plan(sweep), "teacher_stage")
    folders = StageFolders(root, teacher)
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(RUNNER), "stage", teacher, "--sweep", str(sweep), "--root", str(root)],
            stdout=subprocess.DEVNULL, stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 120
        while not (folders.checkpoint.is_file() and folders.log.is_file() and read_log(folders.logs)["epochs"]):
            assert process.poll() is None, f"stage exited early: {(tmp_path / 'stderr.txt').read_text()}"
            assert time.monotonic() < deadline, "no epoch finished in 120 s"
            time.sleep(0.02)
        time.sleep(read_log(folders.logs)["epochs"][0]["epoch_time_s"] / 2)  # land inside a later epoch
        assert process.poll() is None, "the stage finished before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL

    killed = read_log(folders.logs)
    assert 1 <= len(killed["epochs"]) < epochs
    assert not folders.is_done() and not folders.final_weights.exists()

    assert runner.main(["stage", str(folders.logs), "--root", str(root)]) == 0
    resumed = read_log(folders.logs)
    assert [entry["epoch"] for entry in resumed["epochs"]] == list(range(1, epochs + 1))
    # The epochs from before the kill are kept as they were (timings included), not trained again.
    assert resumed["epochs"][: len(killed["epochs"])] == killed["epochs"]
    assert [entry["lr"] for entry in resumed["epochs"]] == pytest.approx(
        [0.05 * 0.5 * (1 + math.cos(math.pi * epoch / epochs)) for epoch in range(epochs)]
    )
    assert folders.is_done() and folders.final_weights.is_file()


# 3. Upstream not DONE -----------------------------------------------------------------------------------

def test_student_before_its_teacher_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = write_sweep(tmp_path / "tiny.yaml")
    plan = build_plan(sweep)
    student, teacher = stage_name(plan, "student_stage"), stage_name(plan, "teacher_stage")
    with pytest.raises(StageError) as raised:
        run_stage(plan.stages[student], tmp_path / "out")
    message = one_line(str(raised.value))
    assert teacher in message and "DONE" in message
    assert not StageFolders(tmp_path / "out", student).logs.exists()

    assert runner.main(["stage", student, "--sweep", str(sweep), "--root", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and teacher in one_line(error)


# 4. Corrupt checkpoint ------------------------------------------------------------------------------------

@pytest.mark.parametrize("corruption", ["garbage", "truncated"])
def test_corrupt_checkpoint_is_named(tiny_in_process: SweepRun, tmp_path: Path, corruption: str) -> None:
    teacher = stage_name(tiny_in_process.plan, "teacher_stage")
    folders = StageFolders(tmp_path, teacher)
    folders.weights.mkdir(parents=True)
    good = StageFolders(tiny_in_process.root, teacher).checkpoint.read_bytes()
    bad = b"these bytes are no checkpoint" if corruption == "garbage" else good[: len(good) // 2]
    folders.checkpoint.write_bytes(bad)
    with pytest.raises(CorruptFileError) as raised:
        run_stage(tiny_in_process.plan.stages[teacher], tmp_path)
    assert str(folders.checkpoint) in one_line(str(raised.value))
    assert folders.checkpoint.read_bytes() == bad and not folders.is_done()


# 5. Corrupt log.pkl -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_damaged_log_is_one_error_line(tiny_in_process: SweepRun, tmp_path: Path, damage: str) -> None:
    student = stage_name(tiny_in_process.plan, "student_stage")
    folders = copy_stage(tiny_in_process.root, tmp_path, student)
    if damage == "truncated":
        folders.log.write_bytes(folders.log.read_bytes()[:100])
    else:
        folders.log.unlink()
    with pytest.raises((CorruptFileError, LogError)) as raised:
        read_log(folders.logs)
    assert str(folders.log) in one_line(str(raised.value))

    result = run_runner("logs", str(folders.logs))
    assert result.returncode != 0
    assert result.stderr.startswith("error: ") and str(folders.log) in one_line(result.stderr)
    assert "Traceback" not in result.stderr


# 6. Non-finite loss ---------------------------------------------------------------------------------------------

def test_nan_term_stops_training_in_that_epoch(
    tiny_in_process: SweepRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import distill.kd
    import stages.training

    plan = tiny_in_process.plan
    copy_stage(tiny_in_process.root, tmp_path, stage_name(plan, "teacher_stage"))
    student = StageFolders(tmp_path, stage_name(plan, "student_stage"))
    current_epoch = []
    batches, soft_target_kl = stages.training.training_batches, distill.kd.soft_target_kl

    def recording_batches(data: Any, settings: Any, epoch: int) -> Any:
        current_epoch.append(epoch)
        return batches(data, settings, epoch)

    def nan_in_second_epoch(*args: Any) -> torch.Tensor:
        loss = soft_target_kl(*args)
        return loss * float("nan") if current_epoch[-1] == 1 else loss

    monkeypatch.setattr(stages.training, "training_batches", recording_batches)
    monkeypatch.setattr(distill.kd, "soft_target_kl", nan_in_second_epoch)
    with pytest.raises(NonFiniteLossError) as raised:
        run_stage(plan.stages[student.name], tmp_path)
    message = one_line(str(raised.value))
    assert "'kd'" in message and "nan" in message and "epoch 2 step 1" in message
    assert current_epoch == [0, 1]
    checkpoint = torch.load(student.checkpoint, weights_only=False)
    assert [entry["epoch"] for entry in checkpoint["epochs"]] == [1]
    assert not student.is_done() and not student.final_weights.exists()


def test_epoch_sums_kept_on_the_device_are_the_python_sums_and_name_the_first_non_finite_term() -> None:
    """The loop reads the device once per epoch (and every SYNC_EVERY_STEPS for the NaN check): its
    float64 sums are bit for bit what adding ``.item()`` values in Python gives."""
    from stages.training import _DeviceSums

    generator = torch.Generator().manual_seed(0)
    sums, expected, correct = _DeviceSums(torch.device("cpu")), {"ce": 0.0, "kd": 0.0}, 0
    for step in range(7):
        terms = {name: torch.rand((), generator=generator) * 3 for name in ("ce", "kd")}
        logits, labels = torch.randn(5, 4, generator=generator), torch.randint(4, (5,), generator=generator)
        sums.add(step, terms, 5, logits, labels)
        for name, value in terms.items():
            expected[name] = expected[name] + value.item() * 5
        correct += (logits.argmax(1) == labels).sum().item()
    assert sums.read(Ranks(), 7) == (expected, correct, 7) and sums.first_not_finite() is None

    sums.add(7, {"ce": torch.tensor(1.0), "kd": torch.tensor(float("inf"))}, 5, None, labels)
    sums.add(8, {"ce": torch.tensor(float("nan")), "kd": torch.tensor(float("nan"))}, 5, None, labels)
    assert sums.first_not_finite() == ("kd", float("inf"), 7)  # the earliest, not the last or the first by name


# 7. submit is idempotent ------------------------------------------------------------------------------------------

def test_second_submit_skips_every_stage(tiny_submitted: SweepRun) -> None:
    root, plan = tiny_submitted.root, tiny_submitted.plan
    assert f"[{len(plan.stages)}/{len(plan.stages)}] done" in tiny_submitted.output
    files = [path for name in plan.stages for folder in (StageFolders(root, name).logs, StageFolders(root, name).weights)
             if folder.is_dir() for path in folder.iterdir()]
    before = {path: path.stat().st_mtime_ns for path in files}
    jobs_before = sorted((root / "jobs" / "tiny" / "local").iterdir())

    # In a fresh process that must not import torch: the DONE check and the lock come before preflight.
    script = (
        "import sys, runner; code = runner.main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules, 'a no-op submit imported torch'; sys.exit(code)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, "submit", str(tiny_submitted.sweep), "--root", str(root)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"nothing to do: all {len(plan.stages)} stages of sweep 'tiny' are DONE" in result.stdout
    assert {path: path.stat().st_mtime_ns for path in files} == before
    assert sorted((root / "jobs" / "tiny" / "local").iterdir()) == jobs_before

    manifest = Manifest.load(root / "jobs" / "tiny")
    assert set(manifest.stages) == set(plan.stages)
    assert {entry["state"] for entry in manifest.stages.values()} == {"done"}
    assert temporary_files(root / "logs", root / "weights") == []


def test_a_locked_submit_is_refused_before_importing_torch(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path / "tiny.yaml")
    script = (
        "import sys, runner; code = runner.main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules, 'a refused submit imported torch'; sys.exit(code)"
    )
    with submit_lock(tmp_path / "out" / "jobs" / "tiny"):
        result = subprocess.run(
            [sys.executable, "-c", script, "submit", str(sweep), "--root", str(tmp_path / "out")],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )
    assert result.returncode == 2, result.stderr
    assert f"another submit of this sweep (pid {os.getpid()}) is running" in result.stderr
    assert result.stderr.count("\n") == 1


# 8. A failing stage blocks only its dependants -----------------------------------------------------------------

def test_failed_stage_blocks_only_its_dependants(tiny_in_process: SweepRun, tmp_path: Path) -> None:
    # kd_weight 1e300 overflows float32: the kd term is inf at the first step, a real run-time failure.
    sweep = write_sweep(tmp_path / "tiny.yaml", {"defaults.methods": {"kd": {"kd_weight": 1e300}}})
    plan, root = build_plan(sweep), tmp_path / "out"
    teacher, teacher_evaluate = stage_name(plan, "teacher_stage"), stage_name(plan, "teacher_evaluate_stage")
    assert teacher == stage_name(tiny_in_process.plan, "teacher_stage")
    for name in (teacher, teacher_evaluate):  # DONE already: saves running them again
        copy_stage(tiny_in_process.root, root, name)

    result = run_runner("submit", str(sweep), "--root", str(root))
    assert result.returncode == 1, result.stdout + result.stderr
    kd_student, kd_evaluate = stage_name(plan, "student_stage"), stage_name(plan, "evaluate_stage")
    assert f"failed: {kd_student}: " in result.stderr and "loss term 'kd' is inf at epoch 1" in result.stderr
    assert f"blocked: {kd_evaluate}: upstream stage {kd_student} did not finish" in result.stderr
    assert "Traceback" not in result.stderr

    manifest = Manifest.load(root / "jobs" / "tiny").stages
    for name in plan.stages:
        expected = {kd_student: "failed", kd_evaluate: "blocked"}.get(name, "done")
        assert manifest[name]["state"] == expected, name
        if name in (teacher, teacher_evaluate):
            assert "job_id" not in manifest[name]  # DONE before the submit: recorded, never sent
        assert StageFolders(root, name).is_done() == (expected == "done"), name
    assert json.loads(StageFolders(root, stage_name(plan, "evaluate_stage", "vanilla")).result.read_text())["top1_last"] > 0
