"""configs/crd_cifar100.yaml and crd_cifar100_cross.yaml: CRD's CIFAR-100 Tables 1 and 2 plan with
the paper's recipe, share their teachers, pass preflight against the real tap shapes, and plan every
published cell; and one cell trains.

The cell's first epoch runs on CPU on a small CIFAR-100 written in its official on-disk format, and
the report sets the published number of that cell next to ours.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.catalogue import load_catalogue
from pipeline.plan import Plan, build_plan
from pipeline.report import load_published
from pipeline.sweep import SweepError
from tests.conftest import REPO, run_runner
from tests.test_data import write_cifar100

CONFIG = REPO / "configs" / "crd_cifar100.yaml"
CROSS = REPO / "configs" / "crd_cifar100_cross.yaml"
PAIRS = {("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"), ("resnet110", "resnet20"),
         ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8")}
CROSS_PAIRS = {("vgg13", "mobilenetv2"), ("resnet50", "mobilenetv2"), ("resnet32x4", "shufflenetv1"),
               ("resnet32x4", "shufflenetv2"), ("wrn_40_2", "shufflenetv1")}
CROSS_LEFT_OUT = ("resnet50", "vgg8")
"""Table 2's pair the cross file leaves out: its vgg8 student trains at lr 0.05, the file's at 0.01."""


def _with_data_root(plan: Plan, folder: Path) -> Plan:
    """Preflight needs a data_root to be set, not files in it: the tap shapes come from the catalogue."""
    for spec in plan.stages.values():
        spec.runtime["data_root"] = str(folder)
    return plan


def _training(plan: Plan, kind: str) -> list[dict]:
    return [spec.settings["training"] for spec in plan.stages.values() if spec.kind == kind]


def test_the_crd_table_plans_every_method_on_every_pair_with_the_papers_recipe() -> None:
    plan = build_plan(CONFIG)
    methods = {experiment.method for experiment in plan.experiments}
    assert set(load_catalogue().methods) <= methods and {"crd+kd", "kd+supcon"} <= methods
    assert {(experiment.teacher, experiment.student) for experiment in plan.experiments} == PAIRS
    assert len(plan.experiments) == len(PAIRS) * len(methods) * 3 == 483  # the header comment's count
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



def test_the_cross_table_plans_every_method_but_ft_with_the_small_student_lr() -> None:
    plan, table1 = build_plan(CROSS), build_plan(CONFIG)
    methods = {experiment.method for experiment in plan.experiments}
    assert methods == {experiment.method for experiment in table1.experiments} - {"ft"}
    assert {(experiment.teacher, experiment.student) for experiment in plan.experiments} == CROSS_PAIRS
    assert len(plan.experiments) == len(CROSS_PAIRS) * len(methods) * 3 == 330  # the header comment's count
    assert {training["lr"] for training in _training(plan, "train_student")} == {0.01}  # RepDistiller: mobile_half, ShuffleV1/V2
    assert all(training == _training(table1, "train_teacher")[0] for training in _training(plan, "train_teacher"))
    for training in _training(plan, "train_student"):
        assert (training["epochs"], training["batch_size"], training["lr_schedule"], training["milestones"]) == (240, 64, "step", None)


def test_teachers_of_both_tables_are_the_same_stages() -> None:
    def teachers(plan: Plan) -> dict[str, str]:
        return {spec.settings["arch"]: spec.hash for spec in plan.stages.values() if spec.kind == "train_teacher"}

    table1, cross = teachers(build_plan(CONFIG)), teachers(build_plan(CROSS))
    assert set(table1) & set(cross) == {"vgg13", "resnet32x4", "wrn_40_2"}
    assert all(table1[arch] == cross[arch] for arch in set(table1) & set(cross))
    assert set(cross) - set(table1) == {"resnet50"}


def test_both_tables_pass_preflight_against_the_real_tap_shapes(tmp_path: Path) -> None:
    from stages.preflight import check_plan

    catalogue = load_catalogue()
    for path in (CONFIG, CROSS):
        check_plan(_with_data_root(build_plan(path), tmp_path), catalogue)


def test_preflight_refuses_ft_on_the_cross_pairs_which_is_why_the_file_leaves_it_out(tmp_path: Path) -> None:
    from stages.preflight import check_plan

    sweep = yaml.safe_load(CROSS.read_text())
    sweep["axes"] |= {"pair": ["resnet32x4:shufflenetv1"], "method": ["ft"], "seed": [0]}
    sweep["defaults"]["methods"]["ft"] = {"paraphraser_epochs": 30}
    path = tmp_path / "cross_ft.yaml"
    path.write_text(yaml.safe_dump(sweep))
    with pytest.raises(SweepError, match=r"methods\.ft\.student_tap: .* 4x4 and teacher tap 'layer3' is 8x8"):
        check_plan(_with_data_root(build_plan(path), tmp_path), load_catalogue())


def test_every_published_cell_of_the_planned_pairs_has_an_experiment() -> None:
    """Cells of both files' pairs, teacher and vanilla rows included; the cross file's gaps are only the
    documented ones (ft, and the pair resnet50 -> vgg8)."""
    planned = set()
    for path in (CONFIG, CROSS):
        for experiment in build_plan(path).experiments:
            planned |= {(experiment.teacher, experiment.student, experiment.method), (experiment.teacher, experiment.student, "teacher")}
    published = {(teacher, student, method) for dataset, teacher, student, method in load_published().references if dataset == "cifar100"}
    new_pairs = PAIRS | CROSS_PAIRS | {CROSS_LEFT_OUT}
    cells = {cell for cell in published if cell[:2] in new_pairs}
    assert len(cells) == 7 * 13 + 6 * 13 + 11 + 6  # CRD's Tables 1 and 2 (13 rows each), DKD's 6 + 5, DIST's 6 cells
    missing = cells - planned
    assert missing == {(*pair, "ft") for pair in CROSS_PAIRS} | {cell for cell in cells if cell[:2] == CROSS_LEFT_OUT}


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
