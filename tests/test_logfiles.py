"""The log reader: tables a person can scan, and one-line errors that name the file."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest

from pipeline import store
from pipeline.logfiles import LogError, format_log, read_log


VAL_ACC = (60.0, 71.5, 65.0)


def student_log(epochs: int = len(VAL_ACC), best_epoch: int | None = 2) -> dict[str, Any]:
    """A train_student log shaped as the stages write it, with two named loss terms."""
    return {
        "format": 1,
        "stage": "train_student",
        "name": "train_student-kd-resnet20-1a2b3c4d",
        "hash": "1a2b3c4d",
        "settings": {"method": "kd", "lr": 0.05},
        "environment": {"python": "3.12.1", "torch": "2.13.0", "device": "cpu", "seed": 0, "threads": 4},
        "epochs": [
            {
                "epoch": epoch,
                "train_loss": 2.0 / epoch,
                "terms": {"ce": 1.0 / epoch, "kd": 1.0 / epoch},
                "train_acc": 50.0 + epoch,
                "val_acc": VAL_ACC[epoch - 1],
                "test_acc": 55.0 + epoch,
                "lr": 0.05,
                "epoch_time_s": 30.0,
            }
            for epoch in range(1, epochs + 1)
        ],
        "best_epoch": best_epoch,
        "status": "done",
    }


def paraphraser_log() -> dict[str, Any]:
    log = student_log()
    log["stage"] = "pretrain_paraphraser"
    for entry in log["epochs"]:
        entry.update(terms={"reconstruction": 0.5 / entry["epoch"]}, train_acc=None, val_acc=None, test_acc=None)
    log["best_epoch"] = None
    return log


def test_table_has_a_column_per_term_and_marks_the_best_epoch(tmp_path: Path) -> None:
    store.write_pickle(tmp_path / "log.pkl", student_log())
    text = format_log(read_log(tmp_path))
    header = text.splitlines()[0].split()
    assert {"ce", "kd", "epoch"} <= set(header)
    assert header.count("acc") == 3
    rows = [line.split() for line in text.splitlines()[1:4]]
    assert [row[0] for row in rows] == ["1", "2*", "3"]
    assert "best epoch (on validation): 2   val acc 71.50   test acc 57.00" in text
    assert "last test acc: 58.00" in text
    assert "total time: 1m 30s" in text
    assert "environment: python 3.12.1, torch 2.13.0, device cpu, seed 0, threads 4" in text


def test_read_log_accepts_the_pickle_path(tmp_path: Path) -> None:
    store.write_pickle(tmp_path / "log.pkl", student_log())
    assert read_log(tmp_path / "log.pkl")["best_epoch"] == 2


def test_paraphraser_table_leaves_out_accuracy_columns() -> None:
    text = format_log(paraphraser_log())
    assert "reconstruction" in text.splitlines()[0]
    assert "acc" not in text.splitlines()[0]
    assert "best epoch" not in text


def test_evaluate_log_shows_its_result() -> None:
    log = student_log()
    log.update(stage="evaluate", result={"top1_last": 58.0, "agreement_last": None, "best_epoch": 2})
    assert "result: top1_last 58.00, agreement_last -, best_epoch 2" in format_log(log)


def test_running_log_without_epochs_formats() -> None:
    log = student_log(epochs=0, best_epoch=None)
    log["status"] = "running"
    text = format_log(log)
    assert "epochs run: 0" in text and "status: running" in text


def test_missing_log_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(LogError, match=str(tmp_path / "log.pkl")):
        read_log(tmp_path)


def test_truncated_log_is_a_corrupt_file_error_naming_it(tmp_path: Path) -> None:
    file = tmp_path / "log.pkl"
    file.write_bytes(pickle.dumps(student_log())[:40])
    with pytest.raises(store.CorruptFileError, match=str(file)):
        read_log(tmp_path)


def test_missing_key_names_the_file_and_key(tmp_path: Path) -> None:
    log = student_log()
    del log["best_epoch"]
    store.write_pickle(tmp_path / "log.pkl", log)
    with pytest.raises(LogError, match=f"{tmp_path / 'log.pkl'}: missing key 'best_epoch'") as caught:
        read_log(tmp_path)
    assert "\n" not in str(caught.value)


def test_missing_epoch_key_names_the_epoch(tmp_path: Path) -> None:
    log = student_log()
    del log["epochs"][1]["lr"]
    store.write_pickle(tmp_path / "log.pkl", log)
    with pytest.raises(LogError, match="epoch 2 is missing key 'lr'"):
        read_log(tmp_path)
