"""The runtime switches (amp, channels_last, compile, cudnn_benchmark) on a CPU, where no GPU is at hand.

What they must not do is checked on real stages: move what a CPU stage computes (amp, channels_last
and cudnn_benchmark are CUDA's, off on a CPU), change a checkpoint's keys (compile keeps the module
object) or stop a stage whose compile fails (it falls back to eager, recorded in log.pkl). That they
are kept out of the stage hashes is tests/test_plan.py's. What compile does when it works is the slow
test at the end: torch's inductor builds C++ on this CPU, which takes 95 s for the tiny teacher.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from torch import nn

from pipeline.logfiles import read_log
from pipeline.plan import Plan, build_plan
from pipeline.store import StageFolders
from stages import run_stage
from stages.files import load_torch
from stages.runtime import RuntimeSwitches, compile_call
from stages.training import predict
from tests.conftest import copy_stage, stage_name, write_sweep

pytestmark = pytest.mark.usefixtures("restore_torch_threads")

ALL_ON = {"amp": True, "channels_last": True, "compile": True, "cudnn_benchmark": True}
FAKE_FAILURE = "fake compiler failure"


def switched_sweep(path: Path, switches: dict[str, bool]) -> Plan:
    """The tiny sweep's kd experiment, one epoch per training stage, with ``switches`` in every section that runs a network."""
    changes: dict[str, Any] = {"axes.method": ["kd"], "defaults.teacher.epochs": 1, "defaults.student.epochs": 1}
    for section in ("teacher", "student", "evaluate"):
        changes.update({f"defaults.{section}.{key}": value for key, value in switches.items()})
    return build_plan(write_sweep(path, changes))


def failing_compile(function: Callable[..., Any]) -> Callable[..., Any]:
    """A torch.compile whose compiled call fails the way a missing C compiler makes inductor fail: at the first call."""

    def compiled(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{FAKE_FAILURE}\nwith a second line a log must not hold")

    return compiled


@dataclass(frozen=True)
class Runs:
    plain: Plan
    switched: Plan
    plain_root: Path
    switched_root: Path
    switched_stderr: str


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    """The kd experiment run in this process twice: every switch off, and every switch on with a compile that fails."""
    base = tmp_path_factory.mktemp("runtime_switches")
    plain, switched = switched_sweep(base / "plain.yaml", {}), switched_sweep(base / "switched.yaml", ALL_ON)
    threads = torch.get_num_threads()
    stderr = io.StringIO()
    try:
        for spec in plain.stages.values():
            run_stage(spec, base / "plain")
        with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(stderr):
            patch.setattr(torch, "compile", failing_compile)
            for spec in switched.stages.values():
                run_stage(spec, base / "switched")
    finally:
        torch.set_num_threads(threads)
    yield Runs(plain, switched, base / "plain", base / "switched", stderr.getvalue())


def logs(plan: Plan, root: Path) -> dict[str, dict[str, Any]]:
    """Each stage's log.pkl, by stage kind (the kd experiment has one teacher_evaluate and one evaluate: by field)."""
    fields = ("teacher_stage", "teacher_evaluate_stage", "student_stage", "evaluate_stage")
    return {field: read_log(StageFolders(root, stage_name(plan, field)).logs) for field in fields}


def test_switches_move_no_stage_of_the_run(runs: Runs) -> None:
    assert list(runs.switched.stages) == list(runs.plain.stages)
    assert runs.switched.stages[stage_name(runs.switched, "teacher_stage")].runtime["compile"] is True


def test_the_log_records_each_switch_as_it_took_effect(runs: Runs) -> None:
    for field, log in logs(runs.plain, runs.plain_root).items():
        environment = log["environment"]
        assert {key: environment[key] for key in ALL_ON} == dict.fromkeys(ALL_ON, False), field
        assert log["compile_fallback"] is None, field
    for field, log in logs(runs.switched, runs.switched_root).items():
        environment = log["environment"]
        # On a CPU only compile takes effect; the others are CUDA's.
        assert {key: environment[key] for key in ALL_ON} == {
            "amp": False, "channels_last": False, "compile": True, "cudnn_benchmark": False,
        }, field
    assert torch.backends.cudnn.benchmark is False


def test_a_failing_compile_runs_eager_with_one_warning_line_per_module(runs: Runs) -> None:
    reason = f"RuntimeError: {FAKE_FAILURE}"
    fallbacks = {field: log["compile_fallback"] for field, log in logs(runs.switched, runs.switched_root).items()}
    assert fallbacks == {
        "teacher_stage": {"teacher": reason},
        "teacher_evaluate_stage": {"model": reason, "best model": reason},
        "student_stage": {"student": reason, "teacher": reason, "method": reason},
        "evaluate_stage": {"model": reason, "teacher": reason, "best model": reason},
    }
    warnings = [line for line in re.split(r"[\r\n]", runs.switched_stderr) if line.startswith("warning: ")]
    assert len(warnings) == sum(len(fallback) for fallback in fallbacks.values())
    teacher = stage_name(runs.switched, "teacher_stage")
    assert f"warning: {teacher}: torch.compile of the teacher failed, it runs eager: {reason}" in warnings


def test_cpu_switches_compute_exactly_what_the_plain_run_computes(runs: Runs) -> None:
    """The fallback is plain eager and channels_last is off on a CPU: weights, losses and scores are the plain run's."""
    for field in ("teacher_stage", "student_stage"):
        plain = StageFolders(runs.plain_root, stage_name(runs.plain, field))
        switched = StageFolders(runs.switched_root, stage_name(runs.switched, field))
        for file in ("final_weights", "best_weights"):
            expected, got = load_torch(getattr(plain, file)), load_torch(getattr(switched, file))
            assert list(got["model"]) == list(expected["model"]), (field, file)
            assert all(torch.equal(got["model"][key], expected["model"][key]) for key in expected["model"]), (field, file)
        assert list(load_torch(switched.checkpoint)["modules"]) == list(load_torch(plain.checkpoint)["modules"]), field
        assert read_log(switched.logs)["epochs"][0]["terms"] == read_log(plain.logs)["epochs"][0]["terms"], field
    for field in ("teacher_evaluate_stage", "evaluate_stage"):
        plain_result = StageFolders(runs.plain_root, stage_name(runs.plain, field)).result.read_text()
        switched_result = StageFolders(runs.switched_root, stage_name(runs.switched, field)).result.read_text()
        assert json.loads(switched_result) == json.loads(plain_result), field


def test_a_compiled_stage_resumes_an_eager_checkpoint(runs: Runs, tmp_path: Path) -> None:
    """compile is not hashed, so the same stage may resume with it switched on: the keys must still match."""
    teacher = stage_name(runs.plain, "teacher_stage")
    folders = copy_stage(runs.plain_root, tmp_path, teacher)
    folders.final_weights.unlink()
    folders.done_marker.unlink()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "compile", failing_compile)
        assert run_stage(runs.switched.stages[teacher], tmp_path) == "done"
    log = read_log(folders.logs)
    assert log["resumed_after_epochs"] == [1] and log["environment"]["compile"] is True
    model_keys = list(load_torch(folders.final_weights)["model"])
    assert list(load_torch(folders.checkpoint)["modules"]) == [f"model.{key}" for key in model_keys]


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.inputs_channels_last: list[bool] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.inputs_channels_last.append(images.is_contiguous(memory_format=torch.channels_last))
        return self.conv(images).mean(dim=(2, 3))


def test_compile_call_falls_back_at_the_first_failing_call_and_stays_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def compile_that_fails(function: Callable[..., Any]) -> Callable[..., Any]:
        def compiled(*args: Any, **kwargs: Any) -> Any:
            calls.append("compiled")
            raise RuntimeError(FAKE_FAILURE)

        return compiled

    monkeypatch.setattr(torch, "compile", compile_that_fails)
    module, reasons = _Tiny(), []
    compile_call(module, "forward", reasons.append)
    images = torch.randn(2, 3, 5, 5)
    expected = module.conv(images).mean(dim=(2, 3))
    assert torch.equal(module(images), expected) and torch.equal(module(images), expected)
    assert calls == ["compiled"] and reasons == [f"RuntimeError: {FAKE_FAILURE}"]
    assert "forward" not in vars(module)  # the class's own forward again, nothing left behind


def test_compile_call_falls_back_when_torch_compile_itself_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    def refusing(function: Callable[..., Any]) -> Callable[..., Any]:
        raise RuntimeError("Dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", refusing)
    module, reasons = _Tiny(), []
    compile_call(module, "forward", reasons.append)
    assert reasons == ["RuntimeError: Dynamo is not supported on this Python"] and "forward" not in vars(module)
    assert module(torch.randn(1, 3, 5, 5)).shape == (1, 4)


def test_cuda_only_switches_are_off_on_a_cpu_and_on_on_cuda() -> None:
    runtime = {"device": "auto", **ALL_ON}
    assert RuntimeSwitches.on_device(runtime, torch.device("cpu")) == RuntimeSwitches(compile=True)
    assert RuntimeSwitches.on_device(runtime, torch.device("cuda")) == RuntimeSwitches(**ALL_ON)
    assert RuntimeSwitches.on_device({"device": "auto"}, torch.device("cuda")) == RuntimeSwitches()


def test_channels_last_predict_feeds_channels_last_batches_and_gives_the_same_logits() -> None:
    """What channels_last does on a GPU, checked where it can be: the layout of the batches predict hands the model."""
    torch.manual_seed(0)
    model = _Tiny()
    batches = [torch.randint(0, 256, (3, 3, 6, 6), dtype=torch.uint8) for _ in range(2)]

    def normalise(images: torch.Tensor) -> torch.Tensor:
        return images.float() / 255.0

    plain = predict(model, batches, torch.device("cpu"), normalise)
    assert model.inputs_channels_last == [False, False]
    model.inputs_channels_last.clear()
    switched = predict(model, batches, torch.device("cpu"), normalise, RuntimeSwitches(channels_last=True))
    assert model.inputs_channels_last == [True, True]
    assert torch.allclose(switched, plain, atol=1e-6)


@pytest.mark.slow
def test_a_teacher_really_compiled_on_this_cpu_trains_and_keeps_its_keys(tmp_path: Path) -> None:
    """95 s on a 2-core CPU with an empty inductor cache (11 s with a warm one), nearly all of it
    inductor compiling the train and eval graphs."""
    folders = {}
    for name, switches in (("eager", {}), ("compiled", {"compile": True})):
        plan = switched_sweep(tmp_path / f"{name}.yaml", switches)
        teacher = stage_name(plan, "teacher_stage")
        assert run_stage(plan.stages[teacher], tmp_path / name) == "done"
        folders[name] = StageFolders(tmp_path / name, teacher)
    log = read_log(folders["compiled"].logs)
    assert log["compile_fallback"] is None and log["environment"]["compile"] is True
    assert log["epochs"][0]["val_acc"] is not None
    eager = load_torch(folders["eager"].final_weights)["model"]
    assert list(load_torch(folders["compiled"].final_weights)["model"]) == list(eager)
    assert list(load_torch(folders["compiled"].checkpoint)["modules"]) == [f"model.{key}" for key in eager]
