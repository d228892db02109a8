"""The stage graph: expansion, sharing by hash, order, serialisation, and planning without torch."""
from __future__ import annotations

import json
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from data.errors import DatasetNotFoundError
from data.files import NO_DATA_ROOT, fingerprint
from pipeline import plan as plan_module
from pipeline.catalogue import REPO_ROOT
from pipeline.store import StageFolders
from pipeline.sweep import SweepError
from pipeline.hashing import content_hash
from pipeline.plan import Plan, StageSpec, build_plan
from tests.conftest import SweepRun
from tests.test_sweep import BASE_SWEEP, fake_repo, sweep_with, write_sweep  # noqa: F401  (fake_repo is a fixture)

TWO_PAIRS = ["resnet32x4:resnet8x4", "resnet56:resnet8x4"]


@pytest.fixture
def plan_of(tmp_path: Path, fake_repo: Path) -> Callable[..., Plan]:
    """Plans BASE_SWEEP after an edit, against the fake repository."""
    count = iter(range(1000))

    def plan(change: Callable[[dict[str, Any]], Any] = lambda sweep: None) -> Plan:
        return build_plan(write_sweep(tmp_path, sweep_with(change), f"sweep{next(count)}.yaml"), fake_repo)

    return plan


def stages_of(plan: Plan, kind: str, method: str | None = None) -> list[StageSpec]:
    return [
        stage for stage in plan.stages.values()
        if stage.kind == kind and (method is None or stage.settings.get("method", {}).get("name") == method)
    ]


def experiment_stage(plan: Plan, method: str, field: str, seed: int = 0, teacher: str = "resnet32x4") -> str:
    """The name of stage ``field`` of the first experiment of this method, seed and teacher."""
    for experiment in plan.experiments:
        if (experiment.method, experiment.seed, experiment.teacher) == (method, seed, teacher):
            return getattr(experiment, field)
    raise AssertionError(f"no {method} experiment with seed {seed}")


def test_one_experiment_per_combination(plan_of: Callable[..., Plan]) -> None:
    def axes(sweep: dict[str, Any]) -> None:
        sweep["axes"].update({"pair": TWO_PAIRS, "seed": [0, 1], "student.lr": [0.05, 0.1]})

    plan = plan_of(axes)
    assert len(plan.experiments) == 2 * 4 * 2 * 2
    assert plan.experiments[1].axis_values == {
        "dataset": "digits", "pair": TWO_PAIRS[0], "method": "vanilla", "seed": 0, "student.lr": 0.1
    }


def test_students_of_one_teacher_share_one_teacher_stage(plan_of: Callable[..., Plan]) -> None:
    plan = plan_of(lambda sweep: sweep["axes"].update(seed=[0, 1, 2]))
    [teacher] = stages_of(plan, "train_teacher")
    assert len(stages_of(plan, "train_student")) == 4 * 3
    for method in ("kd", "ft", "tucker"):
        assert all(stage.upstream["teacher"] == teacher.name for stage in stages_of(plan, "train_student", method))
    assert {experiment.teacher_stage for experiment in plan.experiments} == {teacher.name}
    assert len({experiment.teacher_evaluate_stage for experiment in plan.experiments}) == 1


def test_ft_students_share_one_paraphraser_until_its_settings_differ(plan_of: Callable[..., Plan]) -> None:
    plan = plan_of(lambda sweep: sweep["axes"].update({"seed": [0, 1], "methods.ft.beta": [100, 500]}))
    [paraphraser] = stages_of(plan, "pretrain_paraphraser")
    students = stages_of(plan, "train_student", "ft")
    assert len(students) == 4
    assert all(stage.upstream == {"teacher": paraphraser.upstream["teacher"], "paraphraser": paraphraser.name} for stage in students)

    plan = plan_of(lambda sweep: sweep["axes"].update({"methods.ft.paraphraser_epochs": [2, 3]}))
    assert len(stages_of(plan, "pretrain_paraphraser")) == 2


def test_vanilla_student_is_shared_by_pairs_with_its_architecture(plan_of: Callable[..., Plan]) -> None:
    plan = plan_of(lambda sweep: sweep["axes"].update(pair=TWO_PAIRS))
    assert len(stages_of(plan, "train_teacher")) == 2
    [vanilla] = stages_of(plan, "train_student", "vanilla")
    assert vanilla.upstream == {}
    assert len(stages_of(plan, "train_student", "kd")) == 2
    evaluations = {
        experiment.evaluate_stage: experiment.teacher_stage for experiment in plan.experiments if experiment.method == "vanilla"
    }
    assert len(evaluations) == 2, "each pair evaluates the shared vanilla student against its own teacher"
    for name, teacher in evaluations.items():
        assert plan.stages[name].upstream == {"model": vanilla.name, "teacher": teacher}


def test_student_lr_leaves_the_teacher_alone(plan_of: Callable[..., Plan]) -> None:
    slow = plan_of(lambda sweep: sweep["defaults"].update(student={"lr": 0.01}))
    fast = plan_of(lambda sweep: sweep["defaults"].update(student={"lr": 0.1}))
    assert experiment_stage(slow, "kd", "teacher_stage") == experiment_stage(fast, "kd", "teacher_stage")
    assert experiment_stage(slow, "ft", "paraphraser_stage") == experiment_stage(fast, "ft", "paraphraser_stage")
    assert experiment_stage(slow, "kd", "student_stage") != experiment_stage(fast, "kd", "student_stage")


def test_teacher_epochs_move_everything_that_reads_the_teacher(plan_of: Callable[..., Plan]) -> None:
    short = plan_of(lambda sweep: sweep["defaults"].update(teacher={"epochs": 10}))
    long = plan_of(lambda sweep: sweep["defaults"].update(teacher={"epochs": 20}))
    for method, field in [
        ("kd", "teacher_stage"), ("kd", "teacher_evaluate_stage"), ("ft", "paraphraser_stage"), ("kd", "student_stage"),
        ("ft", "student_stage"), ("kd", "evaluate_stage"), ("vanilla", "evaluate_stage"),
    ]:
        assert experiment_stage(short, method, field) != experiment_stage(long, method, field), (method, field)
    assert experiment_stage(short, "vanilla", "student_stage") == experiment_stage(long, "vanilla", "student_stage")


def test_runtime_settings_are_not_hashed(plan_of: Callable[..., Plan]) -> None:
    cpu = plan_of(lambda sweep: sweep["defaults"].update(teacher={"device": "cpu"}, student={"amp": True}))
    cuda = plan_of(lambda sweep: sweep.update(data_root="/data", defaults={**sweep["defaults"], "teacher": {"device": "cuda"}}))
    assert list(cpu.stages) == list(cuda.stages)
    teacher = experiment_stage(cpu, "kd", "teacher_stage")
    switches_off = {"amp": False, "channels_last": False, "compile": False, "cudnn_benchmark": False}
    assert cpu.stages[teacher].runtime == {"data_root": None, "device": "cpu", **switches_off}
    assert cuda.stages[teacher].runtime == {"data_root": "/data", "device": "cuda", **switches_off}


@pytest.mark.parametrize("switch", ["amp", "channels_last", "compile", "cudnn_benchmark"])
def test_runtime_switches_move_no_stage_and_reach_every_network_stage(plan_of: Callable[..., Plan], switch: str) -> None:
    sections = ("teacher", "student", "evaluate")
    plain = plan_of()
    switched = plan_of(lambda sweep: sweep["defaults"].update({section: {switch: True} for section in sections}))
    swept = plan_of(lambda sweep: sweep["axes"].update({f"{section}.{switch}": [False, True] for section in sections}))
    assert list(switched.stages) == list(plain.stages) == list(swept.stages)
    assert [stage.hash for stage in switched.stages.values()] == [stage.hash for stage in plain.stages.values()]
    assert len(swept.experiments) == 8 * len(plain.experiments)
    kinds = {stage.kind for stage in switched.stages.values()}
    assert {"train_teacher", "pretrain_paraphraser", "train_student", "evaluate"} <= kinds
    for stage in switched.stages.values():
        if stage.kind != "prepare_data":
            assert stage.runtime[switch] is True and plain.stages[stage.name].runtime[switch] is False, stage.name
            assert f'"{switch}"' not in json.dumps(stage.settings), stage.name


_DATA_READING_FIELDS = [
    ("kd", "teacher_stage"), ("kd", "teacher_evaluate_stage"), ("ft", "paraphraser_stage"), ("kd", "student_stage"),
    ("vanilla", "student_stage"), ("kd", "evaluate_stage"), ("vanilla", "evaluate_stage"),
]
"""Every stage kind that reads the data set, by (method, experiment field)."""


@pytest.fixture(scope="module")
def cifar100_roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two data roots of official-format CIFAR-100 with other images, and a copy of the first elsewhere."""
    from tests.test_data import settled, write_cifar100_root

    base = tmp_path_factory.mktemp("cifar100_roots")
    first, other = write_cifar100_root(base / "first", seed=0), write_cifar100_root(base / "other", seed=1)
    copy = base / "elsewhere" / "copy"
    shutil.copytree(first / "cifar-100-python", copy / "cifar-100-python")
    return {"first": settled(first), "other": settled(other), "copy": settled(copy)}


def _on_cifar100(root: Path | None) -> Callable[[dict[str, Any]], None]:
    def change(sweep: dict[str, Any]) -> None:
        sweep["axes"]["dataset"] = ["cifar100"]
        if root is not None:
            sweep["data_root"] = str(root)

    return change


def test_data_content_is_hashed_and_its_location_is_not(
    plan_of: Callable[..., Plan], cifar100_roots: dict[str, Path]
) -> None:
    first, other, copy = (plan_of(_on_cifar100(cifar100_roots[name])) for name in ("first", "other", "copy"))
    assert list(first.stages) == list(copy.stages), "the same files in another folder are the same stages"
    for method, field in _DATA_READING_FIELDS:
        assert experiment_stage(first, method, field) != experiment_stage(other, method, field), (method, field)
    teacher = first.stages[experiment_stage(first, "kd", "teacher_stage")]
    assert teacher.settings["dataset"]["fingerprint"] == fingerprint("cifar100", str(cifar100_roots["first"]))
    assert teacher.runtime["data_root"] == str(cifar100_roots["first"])
    assert copy.stages[teacher.name].runtime["data_root"] == str(cifar100_roots["copy"])


def test_each_data_set_is_fingerprinted_once_per_plan(
    plan_of: Callable[..., Plan], cifar100_roots: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = plan_module.dataset_fingerprint

    def counted(dataset: Any, root: str | None) -> str:
        calls.append(dataset.name)
        return real(dataset, root)

    monkeypatch.setattr(plan_module, "dataset_fingerprint", counted)

    def many(sweep: dict[str, Any]) -> None:
        _on_cifar100(cifar100_roots["first"])(sweep)
        sweep["axes"].update(dataset=["cifar100", "digits"], pair=TWO_PAIRS, seed=[0, 1, 2])

    assert len(plan_of(many).experiments) == 2 * 2 * 4 * 3
    assert sorted(calls) == ["cifar100", "digits"]


def test_without_a_data_root_the_plan_prints_and_submit_refuses(
    plan_of: Callable[..., Plan], fake_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.catalogue import load_catalogue
    from stages.preflight import check_plan

    monkeypatch.delenv("KDBENCH_DATA", raising=False)
    plan = plan_of(_on_cifar100(None))
    assert plan.format().count("\n") == len(plan.stages)
    recorded = {stage.settings["dataset"]["fingerprint"] for stage in plan.stages.values()}
    assert recorded == {NO_DATA_ROOT}
    with pytest.raises(SweepError, match="data_root: data set cifar100 reads files"):
        check_plan(plan, load_catalogue(fake_repo))


def test_missing_data_files_are_named_when_planning(plan_of: Callable[..., Plan], tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as raised:
        plan_of(_on_cifar100(tmp_path / "empty"))
    assert str(tmp_path / "empty" / "cifar-100-python.tar.gz") in str(raised.value) and "\n" not in str(raised.value)


def test_config_json_records_the_fingerprint(tiny_in_process: SweepRun) -> None:
    teacher = tiny_in_process.plan.stages[tiny_in_process.plan.experiments[0].teacher_stage]
    config = json.loads(StageFolders(tiny_in_process.root, teacher.name).config.read_text())
    assert config["settings"]["dataset"]["fingerprint"] == fingerprint("digits", None)


def test_four_and_four_point_zero_hash_alike(plan_of: Callable[..., Plan]) -> None:
    assert content_hash({"temperature": 4, "lr": [1, 0.5]}) == content_hash({"lr": [1.0, 0.5], "temperature": 4.0})
    as_int = plan_of(lambda sweep: sweep["defaults"]["methods"].update(kd={"temperature": 4}))
    as_float = plan_of(lambda sweep: sweep["defaults"]["methods"].update(kd={"temperature": 4.0}))
    assert experiment_stage(as_int, "kd", "student_stage") == experiment_stage(as_float, "kd", "student_stage")


def test_stage_names_and_settings(plan_of: Callable[..., Plan]) -> None:
    plan = plan_of()
    hash8 = "[0-9a-f]{8}"
    expected = {
        "teacher_stage": f"train_teacher-digits-resnet32x4-{hash8}",
        "teacher_evaluate_stage": f"evaluate-digits-resnet32x4-teacher-{hash8}",
        "paraphraser_stage": f"pretrain_paraphraser-digits-resnet32x4-{hash8}",
        "student_stage": f"train_student-digits-resnet8x4-ft-s0-{hash8}",
        "evaluate_stage": f"evaluate-digits-resnet8x4-ft-s0-{hash8}",
    }
    for field, pattern in expected.items():
        name = experiment_stage(plan, "ft", field)
        assert re.fullmatch(pattern, name) and plan.stages[name].hash.startswith(name[-8:])

    student = plan.stages[experiment_stage(plan, "ft", "student_stage")]
    assert student.settings["dataset"] == {
        "name": "digits", "val_fraction": 0.1, "split_seed": 0, "fingerprint": fingerprint("digits", None)
    }
    assert student.settings["training"]["seed"] == 0 and "device" not in student.settings["training"]
    assert student.settings["method"]["params"]["paraphraser_epochs"] == 2
    assert student.settings["method"]["params"]["recon_loss"] == "l1"
    assert student.resources == {"time_min": 60, "cpus": 2, "gpus": 0, "mem_gb": 4.0}
    paraphraser = plan.stages[experiment_stage(plan, "ft", "paraphraser_stage")]
    pre_stage_params = {"paraphraser_epochs", "factor_rate", "teacher_tap"}  # the fake FT's pre_stage list
    assert paraphraser.settings == {
        "dataset": student.settings["dataset"], "teacher_arch": "resnet32x4",
        "method": {"name": "ft", "params": {key: student.settings["method"]["params"][key] for key in pre_stage_params}},
    }  # only what the paraphraser depends on, not the student-side FT params
    evaluate = plan.stages[experiment_stage(plan, "ft", "evaluate_stage")]
    assert evaluate.settings == {"dataset": student.settings["dataset"], "batch_size": 256}


def test_stages_are_in_topological_group_order(plan_of: Callable[..., Plan]) -> None:
    plan = plan_of(lambda sweep: sweep["axes"].update(pair=TWO_PAIRS, seed=[0, 1]))
    seen: set[str] = set()
    for stage in plan.stages.values():
        assert seen.issuperset(stage.upstream.values()), stage.name
        seen.add(stage.name)
    teacher_evaluates = {experiment.teacher_evaluate_stage for experiment in plan.experiments}
    groups = ["teacher_evaluate" if name in teacher_evaluates else stage.kind for name, stage in plan.stages.items()]
    order = ["train_teacher", "teacher_evaluate", "pretrain_paraphraser", "train_student", "evaluate"]
    assert groups == sorted(groups, key=order.index)


def test_plan_survives_json_and_pickle(plan_of: Callable[..., Plan]) -> None:
    plan = plan_of(lambda sweep: sweep["axes"].update(pair=TWO_PAIRS))
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    stage = next(iter(plan.stages.values()))
    assert pickle.loads(pickle.dumps(stage)) == stage == StageSpec.from_dict(json.loads(json.dumps(stage.to_dict())))


def test_format_lists_every_stage_with_its_upstream(plan_of: Callable[..., Plan]) -> None:
    plan = plan_of()
    lines = plan.format().splitlines()
    assert lines[0].startswith(f"sweep unit ({plan.sweep_path}): 4 experiments, {len(plan.stages)} stages")
    assert len(lines) == 1 + len(plan.stages)
    student = plan.stages[experiment_stage(plan, "ft", "student_stage")]
    [line] = [line for line in lines if line.startswith(student.name)]
    assert line.split()[1] == "train_student" and line.endswith("<- " + ", ".join(student.upstream.values()))


def test_repository_sweeps_plan_without_importing_torch() -> None:
    script = (
        "import sys\n"
        "import pipeline.plan\n"
        "assert 'torch' not in sys.modules, 'importing pipeline.plan imported torch'\n"
        "demo = pipeline.plan.build_plan('configs/demo.yaml')\n"
        "full = pipeline.plan.build_plan('configs/example_full.yaml')\n"
        "assert 'torch' not in sys.modules, 'planning imported torch'\n"
        "assert 'sklearn' not in sys.modules and 'numpy' not in sys.modules, 'fingerprinting digits imported them'\n"
        "print(len(demo.experiments), len(full.experiments))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["8", "72"]
