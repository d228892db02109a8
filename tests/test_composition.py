"""Compositions of methods, ``at+kd``: planned with every part's settings hashed, trained with CE once.

The CRD paper's "X+KD" rows and ConKD's ``kd+supcon`` are compositions; a composition that counted
the labelled term twice, or whose hash missed a part's setting, would print numbers that mean
something other than the paper's.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from distill.base import Batch, MethodConfigError, MethodContext, ModelOutput
from distill.composition import Composition, build_method, check_method
from pipeline.catalogue import load_catalogue
from pipeline.plan import build_plan
from pipeline.sweep import SweepError
from stages.preflight import check_plan
from tests.conftest import train_student_on_digits, write_sweep


def student_settings(plan, method: str) -> dict[str, Any]:
    experiment = next(experiment for experiment in plan.experiments if experiment.method == method)
    return plan.stages[experiment.student_stage]


def plan_of(tmp_path: Path, methods: list[str], **changes: Any):
    return build_plan(write_sweep(tmp_path / "sweep.yaml", {"axes.method": methods, **changes}))


# --- planning ------------------------------------------------------------------------------------

def test_a_composition_plans_with_each_parts_params_and_one_ce_weight(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, ["at", "kd", "at+kd"])
    composed = student_settings(plan, "at+kd").settings["method"]
    assert composed["name"] == "at+kd" and [part["name"] for part in composed["parts"]] == ["at", "kd"]
    at_params, kd_params = (part["params"] for part in composed["parts"])
    assert at_params == student_settings(plan, "at").settings["method"]["params"]
    assert "ce_weight" in at_params and "ce_weight" not in kd_params
    assert kd_params == {k: v for k, v in student_settings(plan, "kd").settings["method"]["params"].items() if k != "ce_weight"}
    assert set(student_settings(plan, "at+kd").upstream) == {"teacher"}


def test_single_methods_keep_their_settings_shape_so_existing_hashes_do_not_move(tmp_path: Path) -> None:
    settings = student_settings(plan_of(tmp_path, ["kd"]), "kd").settings["method"]
    assert set(settings) == {"name", "params"} and settings["name"] == "kd"


def test_the_hash_covers_every_parts_settings_but_not_an_unused_ce_weight(tmp_path: Path) -> None:
    def composed_hash(**kd_params: Any) -> str:
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        changes = {"defaults.methods.kd": kd_params} if kd_params else {}
        return student_settings(plan_of(folder, ["at+kd"], **changes), "at+kd").hash

    base = composed_hash()
    assert composed_hash(temperature=2.0) != base
    assert composed_hash(ce_weight=0.7) == base  # kd's ce_weight weighs nothing in at+kd
    assert student_settings(plan_of(tmp_path / "x", ["kd+at"]), "kd+at").hash != base


def test_an_axis_of_a_parts_param_reaches_that_part_in_every_composition(tmp_path: Path) -> None:
    axes = {"dataset": ["digits"], "pair": ["resnet20:resnet8x0.25"], "method": ["kd", "crd+kd"],
            "methods.kd.temperature": [2.0, 4.0]}
    plan = build_plan(write_sweep(tmp_path / "sweep.yaml", {"axes": axes}))
    temperatures = sorted(
        (experiment.method, plan.stages[experiment.student_stage].settings["method"].get("params", {}).get("temperature")
         or plan.stages[experiment.student_stage].settings["method"]["parts"][1]["params"]["temperature"])
        for experiment in plan.experiments
    )
    assert temperatures == [("crd+kd", 2.0), ("crd+kd", 4.0), ("kd", 2.0), ("kd", 4.0)]


def test_a_composition_with_a_pre_stage_gets_that_parts_pre_stage_shared_with_the_method_alone(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, ["ft", "ft+kd"], **{"defaults.methods.ft": {"paraphraser_epochs": 1}})
    alone, composed = student_settings(plan, "ft"), student_settings(plan, "ft+kd")
    assert composed.upstream["paraphraser"] == alone.upstream["paraphraser"]
    assert sum(spec.kind == "pretrain_paraphraser" for spec in plan.stages.values()) == 1


def test_a_composition_may_give_its_parts_their_own_values_without_touching_the_method_alone(tmp_path: Path) -> None:
    # RepDistiller's KD row is -r 0.1 -a 0.9, its CRD+KD row -a 1: both in one sweep.
    plan = plan_of(tmp_path, ["kd", "crd+kd"], **{"defaults.methods": {"kd": {"kd_weight": 0.9}, "crd+kd": {"kd": {"kd_weight": 1.0}}}})
    assert student_settings(plan, "kd").settings["method"]["params"]["kd_weight"] == 0.9
    assert student_settings(plan, "crd+kd").settings["method"]["parts"][1]["params"]["kd_weight"] == 1.0


@pytest.mark.parametrize("methods, key", [
    ({"crd+kd": {"at": {"weight": 1.0}}}, "defaults.methods.crd+kd.at: unknown part of crd+kd 'at'"),
    ({"crd+kd": {"kd": {"kd_wieght": 1.0}}}, "defaults.methods.crd+kd.kd.kd_wieght: unknown kd param"),
    ({"crd+kd": {"kd": {"kd_weight": -1.0}}}, "defaults.methods.crd+kd.kd.kd_weight: "),
    ({"kd+kd": {}}, "defaults.methods.kd+kd: 'kd+kd' names method kd twice"),
])
def test_a_compositions_own_values_are_checked_against_its_parts(tmp_path: Path, methods: dict, key: str) -> None:
    with pytest.raises(SweepError) as caught:
        plan_of(tmp_path, ["crd+kd"], **{"defaults.methods": methods})
    assert key in str(caught.value)


@pytest.mark.parametrize("value, message", [
    ("kd+kd", "names method kd twice"),
    ("at+nope", "unknown method 'nope'"),
    ("at+", "unknown method ''"),
])
def test_bad_compositions_are_refused_in_one_line_naming_the_axis(tmp_path: Path, value: str, message: str) -> None:
    with pytest.raises(SweepError) as caught:
        plan_of(tmp_path, [value])
    text = str(caught.value)
    assert "axes.method[0]" in text and message in text and "\n" not in text


def test_a_parts_required_param_and_taps_are_checked_as_for_the_method_alone(tmp_path: Path) -> None:
    with pytest.raises(SweepError, match=r"defaults\.methods\.ft\.paraphraser_epochs: required by method ft"):
        plan_of(tmp_path, ["ft+kd"])
    with pytest.raises(SweepError, match=r"defaults\.methods\.at\.student_taps"):
        plan_of(tmp_path / "taps", ["kd+at"], **{"defaults.methods.at.student_taps": ["layer1", "nope", "layer3"]})


def test_preflight_names_the_part_whose_setting_does_not_fit(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, ["kd+tucker"], **{"defaults.methods.tucker.ranks": [512, 2, 2]})
    with pytest.raises(SweepError, match=r": methods\.tucker\.ranks: "):
        check_plan(plan, load_catalogue())


# --- the loss ------------------------------------------------------------------------------------

CONTEXT = MethodContext(
    num_classes=3,
    teacher_tap_shapes={"layer1": (4, 4, 4), "layer2": (4, 2, 2), "layer3": (4, 2, 2)},
    student_tap_shapes={"layer1": (2, 4, 4), "layer2": (2, 2, 2), "layer3": (2, 2, 2)},
)


def at_kd_settings(**kd: Any) -> dict[str, Any]:
    at = {"teacher_taps": ["layer1"], "student_taps": ["layer1"], "p": 2, "weight": 1000.0, "ce_weight": 0.5}
    return {"name": "at+kd", "parts": [
        {"name": "at", "params": at},
        {"name": "kd", "params": {"temperature": 4.0, "kd_weight": 0.9, "logit_standardization": False, **kd}},
    ]}


def test_at_plus_kd_is_ce_once_plus_the_attention_term_plus_the_kd_term_by_hand() -> None:
    torch.manual_seed(0)
    student_logits, teacher_logits = torch.randn(2, 3), torch.randn(2, 3)
    student_map, teacher_map = torch.randn(2, 2, 4, 4), torch.randn(2, 4, 4, 4)
    labels = torch.tensor([0, 2])
    method = build_method(at_kd_settings(), CONTEXT)
    assert isinstance(method, Composition)
    assert method.teacher_taps == ("layer1",) and method.student_taps == ("layer1",)
    terms = method.loss(
        ModelOutput(student_logits, {"layer1": student_map}), ModelOutput(teacher_logits, {"layer1": teacher_map}),
        Batch(student_map, labels),
    )
    assert set(terms) == {"ce", "at", "kd"}

    ce = sum(-math.log(torch.softmax(student_logits[i], 0)[labels[i]].item()) for i in range(2)) / 2
    kl = 0.0
    for i in range(2):
        p_teacher, p_student = torch.softmax(teacher_logits[i] / 4, 0), torch.softmax(student_logits[i] / 4, 0)
        kl += sum(p_teacher[c].item() * math.log(p_teacher[c].item() / p_student[c].item()) for c in range(3))
    def attention(features: torch.Tensor) -> torch.Tensor:
        squared_mean = (features**2).mean(1).flatten(1)
        return squared_mean / squared_mean.norm(dim=1, keepdim=True)
    at = ((attention(student_map) - attention(teacher_map)) ** 2).mean().item()

    assert terms["ce"].item() == pytest.approx(0.5 * ce, rel=1e-5)
    assert terms["kd"].item() == pytest.approx(0.9 * 16 * kl / 2, rel=1e-5)
    assert terms["at"].item() == pytest.approx(1000 * at, rel=1e-5)


def test_a_term_two_parts_both_log_is_named_after_each_part() -> None:
    settings = {"name": "kd+dkd", "parts": [
        {"name": "kd", "params": {"temperature": 4.0, "kd_weight": 0.9, "ce_weight": 0.1, "logit_standardization": False}},
        {"name": "dkd", "params": {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup_epochs": 20}},
    ]}
    method = build_method(settings, CONTEXT)
    method.parts["dkd"].loss = lambda student, teacher, batch: {"ce": torch.tensor(9.0), "kd": torch.tensor(2.0)}
    logits = torch.randn(2, 3)
    terms = method.loss(ModelOutput(logits), ModelOutput(logits), Batch(logits, torch.tensor([0, 1])))
    assert set(terms) == {"ce", "kd.kd", "dkd.kd"} and terms["dkd.kd"].item() == 2.0


def test_parts_after_the_first_are_built_with_a_zero_ce_weight() -> None:
    method = build_method(at_kd_settings(), CONTEXT)
    assert method.parts["at"].params["ce_weight"] == 0.5 and method.parts["kd"].params["ce_weight"] == 0.0


def test_a_parts_bad_setting_is_reported_under_the_parts_name() -> None:
    settings = at_kd_settings()
    settings["parts"][0]["params"]["student_taps"] = ["layer1", "layer2"]
    with pytest.raises(MethodConfigError) as caught:
        check_method(settings, CONTEXT)
    assert caught.value.key == "at.student_taps"


@pytest.mark.usefixtures("restore_torch_threads")
def test_at_plus_kd_trains_on_digits_and_logs_each_parts_terms(tiny_in_process, tmp_path: Path) -> None:
    log = train_student_on_digits(tiny_in_process, tmp_path, "at+kd", epochs=3)
    epochs = log["epochs"]
    assert set(epochs[0]["terms"]) == {"ce", "at", "kd"}
    for entry in epochs:
        assert all(math.isfinite(value) for value in entry["terms"].values())
        assert entry["train_loss"] == pytest.approx(sum(entry["terms"].values()))
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
