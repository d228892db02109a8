"""Every architecture and every data set of the catalogue through a real sweep: plan, preflight, one epoch.

Slow (a few minutes on 2 cores): run with ``python -m pytest -m slow``. Two sweeps, run stage by
stage in-process on data written in the real on-disk layouts:

* every architecture, in teacher:student pairs for ``kd``, on a small CIFAR-100 (32 px: the size
  the CIFAR zoo is built for and the smallest every torchvision net accepts);
* every data set that reads files besides CIFAR-100 (CIFAR-10, Tiny ImageNet, Imagenette-160, a
  generic image folder, and ImageNet streamed from its JPEGs) with the smallest pair, which fits
  every size (the first sweep trains the large networks).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from data import imagefolder
from pipeline.catalogue import load_catalogue
from pipeline.plan import Plan, build_plan
from pipeline.store import StageFolders, read_pickle
from stages import run_stage
from stages.preflight import check_plan
from tests.conftest import write_sweep
from tests.test_data import _write_cifar10, write_cifar100
from tests.test_imagefolder import _wnids, write_split_folders, write_tiny_imagenet
from tests.test_streaming import write_imagenet

pytestmark = pytest.mark.slow


def _run_and_check(plan: Plan, root: Path) -> dict[str, int]:
    """Runs every stage in plan order; every training stage logged one epoch of finite loss, every
    evaluation a top-1. Returns how many stages of each kind ran."""
    check_plan(plan, load_catalogue())
    ran: dict[str, int] = {}
    for spec in plan.stages.values():
        assert run_stage(spec, root) == "done", spec.name
        ran[spec.kind] = ran.get(spec.kind, 0) + 1
        log = read_pickle(StageFolders(root, spec.name).log)
        if spec.kind in ("train_teacher", "train_student"):
            assert len(log["epochs"]) == 1 and math.isfinite(log["epochs"][0]["train_loss"]), spec.name
        if spec.kind == "evaluate":
            assert log["result"]["top1_last"] is not None, spec.name
    return ran


def test_every_architecture_trains_an_epoch_as_teacher_or_student(tmp_path: Path, restore_torch_threads: None) -> None:
    architectures = sorted(load_catalogue().architectures)
    pairs = [f"{teacher}:{student}" for teacher, student in zip(architectures[0::2], architectures[1::2])]
    if len(architectures) % 2:
        pairs.append(f"{architectures[-1]}:{architectures[0]}")
    data_root = tmp_path / "data"
    write_cifar100(data_root, np.random.default_rng(0), train_count=200, test_count=20)
    sweep = write_sweep(tmp_path / "archs.yaml", {
        "data_root": str(data_root),
        "axes": {"dataset": ["cifar100"], "pair": pairs, "method": ["kd"], "seed": [0]},
        "defaults.teacher": {"epochs": 1, "batch_size": 64},
        "defaults.student": {"epochs": 1, "batch_size": 64},
        "defaults.data": {"val_fraction": 0.1},
        "resources.default.cpus": 2,
    })
    ran = _run_and_check(build_plan(sweep), tmp_path / "out")
    assert ran["train_teacher"] == ran["train_student"] == len(pairs)


def test_every_file_data_set_trains_an_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_torch_threads: None) -> None:
    data_root = tmp_path / "data"
    data_root.mkdir()
    _write_cifar10(data_root, np.random.default_rng(1))
    write_tiny_imagenet(data_root)
    write_split_folders(data_root / "imagenette2-160", _wnids(10), per_class=4, height=160, width=213)
    write_imagenet(data_root)  # train/ and val/ at the root: ImageNet's layout, and a generic image folder's
    monkeypatch.setattr(imagefolder, "IMAGENET_IN_MEMORY", 100)  # so this 1000-image cut streams
    sweep = write_sweep(tmp_path / "datasets.yaml", {
        "data_root": str(data_root),
        "axes": {"dataset": ["cifar10", "tinyimagenet", "imagenette", "imagefolder", "imagenet"],
                 "pair": ["resnet8x0.25:resnet8x0.25"], "method": ["kd"], "seed": [0]},
        "defaults.teacher": {"epochs": 1, "batch_size": 64},
        "defaults.student": {"epochs": 1, "batch_size": 64},
        "defaults.data": {"val_fraction": 0.2},
        "resources.default.cpus": 2,
    })
    plan = build_plan(sweep)
    ran = _run_and_check(plan, tmp_path / "out")
    assert ran["train_teacher"] == 5 and ran["prepare_data"] == 4  # every folder data set decoded (or listed) once
    imagenet = next(spec for spec in plan.stages.values()
                    if spec.kind == "prepare_data" and spec.settings["dataset"]["name"] == "imagenet")
    assert read_pickle(StageFolders(tmp_path / "out", imagenet.name).log)["streamed"] is True
