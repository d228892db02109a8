"""configs/crd_cifar100.yaml: the CRD CIFAR-100 table plans with the paper's recipe, and one cell trains.

The cell's first epoch runs on CPU on a small CIFAR-100 written in its official on-disk format, and
the report sets the published number of that cell next to ours.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.catalogue import load_catalogue
from pipeline.plan import build_plan
from tests.conftest import REPO, run_runner
from tests.test_data import write_cifar100

CONFIG = REPO / "configs" / "crd_cifar100.yaml"
PAIRS = {("resnet56", "resnet20"), ("resnet110", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4")}


def test_the_crd_table_plans_every_method_on_every_pair_with_the_papers_recipe() -> None:
    plan = build_plan(CONFIG)
    methods = {experiment.method for experiment in plan.experiments}
    assert set(load_catalogue().methods) <= methods and {"crd+kd", "kd+supcon"} <= methods
    assert {(experiment.teacher, experiment.student) for experiment in plan.experiments} == PAIRS
    assert len(plan.experiments) == len(PAIRS) * len(methods) * 3
    for spec in plan.stages.values():
        if spec.kind in ("train_teacher", "train_student"):
            training = spec.settings["training"]
            assert (training["epochs"], training["lr"], training["batch_size"]) == (240, 0.05, 64)
            assert (training["lr_schedule"], training["milestones"], training["gamma"]) == ("step", None, 0.1)
            assert (training["momentum"], training["weight_decay"]) == (0.9, 5e-4)
            assert spec.settings["dataset"]["val_fraction"] == 0.0
    crd_kd = next(spec for spec in plan.stages.values() if spec.settings.get("method", {}).get("name") == "crd+kd")
    crd, kd = crd_kd.settings["method"]["parts"]
    assert (crd["params"]["weight"], crd["params"]["ce_weight"], kd["params"]["kd_weight"]) == (0.8, 1.0, 1.0)


@pytest.mark.slow
def test_one_cell_trains_its_first_epoch_on_cpu_and_the_report_shows_its_published_number(tmp_path: Path) -> None:
    write_cifar100(tmp_path / "data", np.random.default_rng(0), train_count=300)
    sweep = yaml.safe_load(CONFIG.read_text())
    sweep["data_root"] = str(tmp_path / "data")
    sweep["axes"] |= {"pair": ["resnet56:resnet20"], "method": ["kd"], "seed": [0]}
    for section in ("teacher", "student"):
        sweep["defaults"][section] |= {"epochs": 1, "device": "cpu"}
    sweep["resources"] = {"default": {"cpus": 2}}
    path = tmp_path / "crd_one_cell.yaml"
    path.write_text(yaml.safe_dump(sweep))

    submitted = run_runner("submit", str(path), "--root", str(tmp_path / "out"), cwd=tmp_path, timeout=1200)
    assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]
    report = run_runner("report", str(path), "--root", str(tmp_path / "out"), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    kd_row = next(line for line in report.stdout.splitlines() if "| kd |" in line)
    assert "70.66" in kd_row  # CRD's Table 1, resnet56 -> resnet20, KD
