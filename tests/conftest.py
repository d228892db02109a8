"""Shared fixtures for the stage and command-line tests: the tiny sweep, run once in-process and once by submit.

The tiny sweep (digits, resnet20 -> resnet8x0.25, vanilla and kd, two epochs each) is the smallest real
sweep: every stage kind but the paraphraser runs on real data in seconds. Both runs are session-scoped so
the many read-side tests share them; a test that changes files copies what it needs first.
"""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import pytest
import yaml

from pipeline.plan import Plan, build_plan
from pipeline.store import StageFolders

REPO = Path(__file__).resolve().parent.parent
RUNNER = REPO / "runner.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

TINY_SWEEP: Mapping[str, Any] = {
    "name": "tiny",
    "axes": {"dataset": ["digits"], "pair": ["resnet20:resnet8x0.25"], "method": ["vanilla", "kd"], "seed": [0]},
    "defaults": {"teacher": {"epochs": 2, "lr_schedule": "cosine"}, "student": {"epochs": 2, "lr_schedule": "cosine"}},
    "resources": {"default": {"cpus": 1}},
}


def write_sweep(path: Path, changes: Mapping[str, Any] | None = None) -> Path:
    """Writes the tiny sweep to ``path`` with ``changes`` applied; keys are dotted paths (``defaults.teacher.epochs``)."""
    sweep = copy.deepcopy(dict(TINY_SWEEP))
    for dotted, value in (changes or {}).items():
        *parents, last = dotted.split(".")
        section = sweep
        for key in parents:
            section = section.setdefault(key, {})
        section[last] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def run_runner(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python runner.py ARGS`` in a fresh process, as a user runs it; KDBENCH_ROOT is unset."""
    environment = {key: value for key, value in os.environ.items() if key != "KDBENCH_ROOT"}
    return subprocess.run(
        [sys.executable, str(RUNNER), *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout
    )


def stage_name(plan: Plan, field: str, method: str = "kd") -> str:
    """The stage an experiment of ``method`` names in ``field`` (``teacher_stage``, ``student_stage``, ...)."""
    experiment = next(experiment for experiment in plan.experiments if experiment.method == method)
    return getattr(experiment, field)


def copy_stage(source_root: Path, target_root: Path, name: str) -> StageFolders:
    """Copies a stage's logs/ and weights/ folders (those it has) into ``target_root``."""
    source, target = StageFolders(source_root, name), StageFolders(target_root, name)
    for origin, destination in ((source.logs, target.logs), (source.weights, target.weights)):
        if origin.is_dir():
            shutil.copytree(origin, destination)
    return target


def temporary_files(*folders: Path) -> list[Path]:
    """Every ``*.tmp`` file (hidden ones too) under ``folders``: what an interrupted atomic write leaves."""
    found = []
    for folder in folders:
        for directory, _, files in os.walk(folder):
            found += [Path(directory) / file for file in files if file.endswith(".tmp")]
    return found


@dataclass(frozen=True)
class SweepRun:
    sweep: Path
    root: Path
    plan: Plan
    output: str = ""


@pytest.fixture(scope="session")
def tiny_in_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SweepRun]:
    """The tiny sweep with every stage run by ``stages.run_stage`` in this process, in plan order."""
    import torch

    from stages import run_stage

    base = tmp_path_factory.mktemp("in_process")
    sweep = write_sweep(base / "tiny.yaml")
    plan = build_plan(sweep)
    threads = torch.get_num_threads()
    try:
        for spec in plan.stages.values():
            run_stage(spec, base / "out")
    finally:
        torch.set_num_threads(threads)
    yield SweepRun(sweep, base / "out", plan)


@pytest.fixture(scope="session")
def tiny_submitted(tmp_path_factory: pytest.TempPathFactory) -> SweepRun:
    """The tiny sweep run once by ``runner.py submit`` (submitit's LocalExecutor) in a subprocess."""
    base = tmp_path_factory.mktemp("submitted")
    sweep = write_sweep(base / "tiny.yaml")
    result = run_runner("submit", str(sweep), "--root", str(base / "out"), cwd=base)
    assert result.returncode == 0, result.stdout + result.stderr
    return SweepRun(sweep, base / "out", build_plan(sweep), result.stdout)


@pytest.fixture
def restore_torch_threads() -> Iterator[None]:
    """Stages pin torch to their ``cpus`` share; give the rest of the session its threads back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def train_student_on_digits(
    tiny_in_process: SweepRun, folder: Path, method: str, params: Mapping[str, Any] | None = None, epochs: int = 3
) -> dict[str, Any]:
    """Trains a ``method`` student of the tiny sweep's pair on digits in this process and returns its log.

    The teacher (and its evaluation) are copied DONE from ``tiny_in_process``, so only the student
    trains; ``params`` go to ``defaults.methods.<method>``. The caller restores torch's threads
    (``restore_torch_threads``).
    """
    from pipeline.logfiles import read_log
    from stages import run_stage

    changes: dict[str, Any] = {"axes.method": [method], "defaults.student.epochs": epochs}
    if params:
        changes[f"defaults.methods.{method}"] = dict(params)
    plan = build_plan(write_sweep(folder / f"{method}.yaml", changes))
    root = folder / "out"
    for name, spec in plan.stages.items():
        if spec.kind == "train_teacher":
            copy_stage(tiny_in_process.root, root, name)
    for name, spec in plan.stages.items():
        if spec.kind in ("pretrain_paraphraser", "fit_pca", "train_student"):
            run_stage(spec, root)
    student = next(spec for spec in plan.stages.values() if spec.kind == "train_student")
    return read_log(StageFolders(root, student.name).logs)
