"""Progress where a user looks (issue 6, point 10): a line per epoch from a local submit that is not
attached to a terminal, live bars when it is, and the epoch of a running stage in ``status``."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from pipeline.leases import read_lease
from pipeline.plan import build_plan
from pipeline.progress import LiveProgress
from pipeline.store import StageFolders, write_pickle
from tests.conftest import RUNNER, SweepRun, run_runner, stage_name, write_sweep


def test_a_local_submit_prints_each_epoch_when_not_on_a_terminal(tiny_submitted: SweepRun) -> None:
    teacher = stage_name(tiny_submitted.plan, "teacher_stage")
    assert re.search(rf"^  {teacher}: epoch 1/2, loss [0-9.]+, ETA \dm\d\ds$", tiny_submitted.output, re.MULTILINE), tiny_submitted.output
    assert "each job's stdout/stderr in " in tiny_submitted.output


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_each_running_stage_gets_a_live_bar(tiny_in_process: SweepRun, tmp_path: Path) -> None:
    plan = tiny_in_process.plan
    name = stage_name(plan, "teacher_stage")
    folders = StageFolders(tmp_path, name)
    log = {"epochs": [{"epoch": 1, "train_loss": 0.5, "epoch_time_s": 3.0}]}
    write_pickle(folders.log, log)
    terminal = Terminal()
    progress = LiveProgress(terminal)
    progress.update({name: (plan.stages[name], folders)})
    progress.report("a line that stays")
    progress.close()
    shown = terminal.getvalue()
    assert "1/2" in shown and "loss 0.5" in shown and "ETA 0m03s" in shown and "a line that stays" in shown


def test_status_shows_the_epoch_of_a_stage_running_anywhere(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path / "tiny.yaml", {"axes.method": ["vanilla"], "defaults.teacher.epochs": 40})
    plan, root = build_plan(sweep), tmp_path / "out"
    teacher = stage_name(plan, "teacher_stage", "vanilla")
    folders = StageFolders(root, teacher)
    environment = {key: value for key, value in os.environ.items() if key != "KDBENCH_ROOT"}
    process = subprocess.Popen(
        [sys.executable, str(RUNNER), "stage", teacher, "--sweep", str(sweep), "--root", str(root)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment,
    )
    try:
        deadline = time.monotonic() + 240
        while not (folders.log.is_file() and read_lease(folders.logs) is not None):
            assert process.poll() is None and time.monotonic() < deadline, "the teacher never logged an epoch"
            time.sleep(0.1)
        status = run_runner("status", str(sweep), "--root", str(root))
    finally:
        process.kill()
        process.wait()
    line = next(line for line in status.stdout.splitlines() if line.startswith(teacher))
    assert re.search(rf"running .*running elsewhere: host \S+, pid {process.pid}, .*epoch \d+/40, loss [0-9.]+, ETA", line), line
