"""The analyze stage: how a sweep asks for it, what the plan shares and hashes, how it samples and
streams taps, what it writes, and how report and layers-quality read it back."""
from __future__ import annotations

import json
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.graph import Experiment, Plan
from pipeline.plan import build_plan
from pipeline.store import StageFolders
from pipeline.sweep import SweepError
from tests.conftest import SweepRun, copy_stage, run_runner, temporary_files, write_sweep

ANALYSIS = {"stats": True, "geometry": True}


def analysed_plan(tmp_path: Path, changes: dict[str, Any] | None = None, name: str = "analysed.yaml") -> Plan:
    return build_plan(write_sweep(tmp_path / name, {"defaults.analysis": dict(ANALYSIS), **(changes or {})}))


def analyze_stages(plan: Plan) -> list:
    return [stage for stage in plan.stages.values() if stage.kind == "analyze"]


# --- sweep and plan -------------------------------------------------------------------------------

def test_analysis_is_off_by_default_and_turning_it_on_moves_no_other_stage(tmp_path: Path) -> None:
    plain = build_plan(write_sweep(tmp_path / "plain.yaml"))
    analysed = analysed_plan(tmp_path)
    assert not analyze_stages(plain)
    assert all(experiment.teacher_analyze_stage is None for experiment in plain.experiments)
    others = {name for name, stage in analysed.stages.items() if stage.kind != "analyze"}
    assert others == set(plain.stages)


def test_one_analyze_stage_per_trained_model_downstream_of_its_training_stage(tmp_path: Path) -> None:
    plan = analysed_plan(tmp_path, {"axes.pair": ["resnet20:resnet8x0.25", "resnet32:resnet8x0.25"]})
    stages = analyze_stages(plan)
    teachers = [stage for stage in stages if stage.settings["role"] == "teacher"]
    students = [stage for stage in stages if stage.settings["role"] == "student"]
    # two teachers; kd students per pair (2) and one vanilla student shared by both pairs
    assert (len(teachers), len(students)) == (2, 3)
    for experiment in plan.experiments:
        assert plan.stages[experiment.teacher_analyze_stage].upstream == {"model": experiment.teacher_stage}
        assert plan.stages[experiment.student_analyze_stage].upstream == {"model": experiment.student_stage}
    assert list(plan.stages)[-len(stages):] == [stage.name for stage in stages], "analyze stages come last"


def test_the_hash_follows_what_changes_a_number_and_not_how_fast_it_is_got(tmp_path: Path) -> None:
    def teacher_analyze(changes: dict[str, Any], name: str) -> str:
        plan = analysed_plan(tmp_path, changes, name)
        return plan.experiments[0].teacher_analyze_stage

    base = teacher_analyze({}, "a.yaml")
    for index, key in enumerate(("batch_size", "models", "device")):
        value = {"batch_size": 17, "models": ["teacher"], "device": "cpu"}[key]
        assert teacher_analyze({f"defaults.analysis.{key}": value}, f"same{index}.yaml") == base, key
    for index, (key, value) in enumerate({"samples": 300, "seed": 1, "taps": ["layer1"], "splits": ["test"],
                                          "legacy_include_diag": True, "legacy_summed_count": True, "legacy_log5": True,
                                          "legacy_ambient_d": True, "stats": False}.items()):
        assert teacher_analyze({f"defaults.analysis.{key}": value}, f"moved{index}.yaml") != base, key


def test_a_few_data_student_is_analysed_on_its_teachers_sample(tmp_path: Path) -> None:
    plan = analysed_plan(tmp_path, {"defaults.data.subset_size": 200})
    student = plan.stages[plan.experiments[0].student_analyze_stage]
    teacher = plan.stages[plan.experiments[0].teacher_analyze_stage]
    assert "subset_size" in plan.stages[plan.experiments[0].student_stage].settings["dataset"]
    assert student.settings["dataset"] == teacher.settings["dataset"]


def test_models_chooses_which_trained_models_are_analysed(tmp_path: Path) -> None:
    plan = analysed_plan(tmp_path, {"defaults.analysis.models": ["teacher"]})
    assert all(experiment.student_analyze_stage is None for experiment in plan.experiments)
    assert len(analyze_stages(plan)) == 1


def test_manifests_written_before_analyze_existed_still_read() -> None:
    old = {"dataset": "digits", "teacher": "resnet20", "student": "resnet8x0.25", "method": "kd", "seed": 0,
           "axis_values": {}, "teacher_stage": "t", "teacher_evaluate_stage": "te", "paraphraser_stage": None,
           "student_stage": "s", "evaluate_stage": "e"}
    assert Experiment.from_dict(old).student_analyze_stage is None
    with pytest.raises(ValueError, match="do not match"):
        Experiment.from_dict({**old, "surprise": 1})
    with pytest.raises(ValueError, match="do not match"):
        Experiment.from_dict({key: value for key, value in old.items() if key != "student_stage"})


@pytest.mark.parametrize("changes, key, allowed", [
    ({"defaults.analysis.taps": ["layer9"]}, "defaults.analysis.taps", "0.."),
    ({"defaults.analysis.taps": [99]}, "defaults.analysis.taps", "0.."),
    ({"defaults.analysis.taps": []}, "defaults.analysis.taps", "null (every generalised layer)"),
    ({"defaults.analysis.samples": 15}, "defaults.analysis.samples", "an int >= 20"),
    ({"defaults.analysis.splits": ["val"]}, "defaults.analysis.splits", "train, test"),
    ({"defaults.analysis.splits": []}, "defaults.analysis.splits", "[train, test]"),
    ({"defaults.analysis.models": ["paraphraser"]}, "defaults.analysis.models", "teacher, student"),
    ({"defaults.analysis.geometry": "yes"}, "defaults.analysis.geometry", ""),
])
def test_bad_analysis_settings_are_refused_in_one_line_naming_file_and_key(
        tmp_path: Path, changes: dict[str, Any], key: str, allowed: str) -> None:
    sweep = write_sweep(tmp_path / "bad.yaml", {"defaults.analysis": dict(ANALYSIS), **changes})
    with pytest.raises(SweepError) as caught:
        build_plan(sweep)
    message = str(caught.value)
    assert message.startswith(f"{sweep}: {key}: ") and "\n" not in message, message
    assert allowed in message


def test_taps_are_not_checked_while_analysis_is_off(tmp_path: Path) -> None:
    build_plan(write_sweep(tmp_path / "off.yaml", {"defaults.analysis.taps": ["layer9"]}))


# --- sampling and streaming -----------------------------------------------------------------------

def test_the_sample_is_class_balanced_seeded_sorted_and_capped_by_the_smallest_class() -> None:
    from stages.analyze import balanced_sample

    labels = np.array([0] * 50 + [1] * 30 + [2] * 8)
    rows, per_class = balanced_sample(labels, 30, seed=3)
    assert per_class == 8 and len(rows) == 24  # 30 // 3 = 10, but class 2 has only 8
    assert np.all(np.bincount(labels[rows]) == 8)
    assert np.all(np.diff(rows) > 0)
    again, _ = balanced_sample(labels, 30, seed=3)
    other, _ = balanced_sample(labels, 30, seed=4)
    assert np.array_equal(rows, again) and not np.array_equal(rows, other)


def test_halving_sizes_go_down_to_two_pixels() -> None:
    from stages.analyze import halving_sizes

    assert halving_sizes(32, 32) == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert halving_sizes(7, 7) == [(3, 3)]
    assert halving_sizes(2, 2) == []


def test_a_tap_streamed_a_few_channels_at_a_time_gives_the_whole_tap_s_numbers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_torch_threads: None) -> None:
    """Features written channel-major batch by batch and read back in groups of channels, their
    statistics on two threads, give what the analysis functions give on the whole tensor at once:
    statistics, Gram-based geometry (a max-pooled map included), histogram, mean map and spectrum;
    a (N, D) embedding's features are its channels."""
    from dataclasses import asdict

    from analysis.feature_stats import histogram, mean_log_power, tap_statistics_at
    from analysis.geometry import flatten_for_geometry, gram_matrix, layer_geometry
    from stages import analyze

    monkeypatch.setattr(analyze, "GROUP_BYTES", 3 * 4 * 40 * 24 * 24)  # 3 of the 40 images' 24x24 channels
    monkeypatch.setattr("analysis.geometry.MAX_FLAT_VALUES", 2_000)  # 8 x 24 x 24 is pooled by 2, 3 channels not
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 24 * 24, 7)).eval()
    images = torch.randn(40, 2, 24, 24)
    labels = np.arange(40) % 4
    settings = {"analysis": {"stats": True, "geometry": True, "seed": 0,
                             **{key: False for key in analyze.LEGACY_SWITCHES}}}
    modules = ["1", "3"]
    with torch.no_grad():
        probe = analyze.probe_taps(model, modules, images[:2])
        recorder = analyze._TapRecorder(model, modules, probe, tmp_path, len(images))
        for batch in images.split(16):  # 16, 16, 8: batches do not fill channel groups evenly
            recorder.run(model, batch)
        recorder.close()
        whole = {"1": model[1](model[0](images)), "3": model(images)}
    for name, features in whole.items():
        seconds = dict.fromkeys(("forward", "stats", "geometry", "arrays"), 0.0)
        entry = analyze.analyse_tap(recorder.files[name], recorder.ranges[name], labels, settings, 1000, seconds)
        maps = features.dim() == 4
        sizes = [None, *analyze.halving_sizes(*features.shape[2:])] if maps else [None]
        native, *pooled = tap_statistics_at(features, sizes)
        assert entry["stats"] == pytest.approx(asdict(native), rel=1e-9, abs=1e-12, nan_ok=True), name
        assert list(entry["stats_at"]) == (["12x12", "6x6", "3x3"] if maps else [])
        for got, want in zip(entry["stats_at"].values(), pooled):
            assert got == pytest.approx(asdict(want), rel=1e-9, abs=1e-12, nan_ok=True), name
        flat = flatten_for_geometry(features)
        expected = layer_geometry(gram_matrix(flat), labels, 1000, flat.shape[1]).as_dict()
        assert entry["geometry"] == pytest.approx(expected, rel=1e-5), name
        assert entry["geometry"]["dimension"] == flat.shape[1] == (8 * 12 * 12 if maps else 7), "the whole tap's kernel"
        np.testing.assert_allclose(entry["histogram"]["density"], histogram(features)["density"], rtol=1e-6)
        if maps:
            np.testing.assert_allclose(entry["mean_map"], features.mean(dim=(0, 1)).double().numpy(), rtol=1e-5)
            np.testing.assert_allclose(entry["log_power"], mean_log_power(features), rtol=1e-4, atol=1e-5)
        else:
            assert entry["mean_map"] is None and entry["log_power"] is None


# --- the stage, on the tiny sweep's trained models ------------------------------------------------

@pytest.fixture(scope="module")
def analysed(tiny_in_process: SweepRun, tmp_path_factory: pytest.TempPathFactory) -> SweepRun:
    """The tiny sweep with analysis on, its trained stages copied from ``tiny_in_process`` (analysis
    moves no training hash) and its analyze stages run in this process."""
    from stages import run_stage

    base = tmp_path_factory.mktemp("analysed")
    sweep = write_sweep(base / "tiny.yaml", {"defaults.analysis": {**ANALYSIS, "samples": 200}})
    plan = build_plan(sweep)
    for name, spec in plan.stages.items():
        if spec.kind != "analyze":
            copy_stage(tiny_in_process.root, base / "out", name)
    threads = torch.get_num_threads()
    try:
        for spec in analyze_stages(plan):
            assert run_stage(spec, base / "out") == "done"
    finally:
        torch.set_num_threads(threads)
    return SweepRun(sweep, base / "out", plan)


def test_every_analyze_stage_writes_its_numbers_arrays_and_figures(analysed: SweepRun) -> None:
    for spec in analyze_stages(analysed.plan):
        folders = StageFolders(analysed.root, spec.name)
        assert folders.is_done() and folders.done_problem(full=True) is None
        numbers = json.loads(folders.analysis_numbers.read_text())
        record = pickle.loads(folders.analysis_record.read_bytes())
        arch = spec.settings["arch"]
        from models.registry import build_model
        from models.taps import generalised_layers

        layers = list(generalised_layers(build_model(arch, 10, (1, 8, 8))))
        assert numbers["taps"] == record["taps"] == layers, "taps null: every generalised layer, in forward order"
        for split in ("train", "test"):
            part = numbers["splits"][split]
            assert part["samples"] == 10 * part["per_class"] and part["per_class"] == 20
            for tap in layers:
                entry, arrays = part["taps"][tap], record["splits"][split]["taps"][tap]
                assert entry["stats"]["std"] > 0, (tap, entry)
                assert set(entry["geometry"]) >= {"separation", "information", "efficiency", "quality", "pca_id", "twonn"}
                assert all(math.isfinite(entry["geometry"][key]) for key in ("separation", "quality")), (tap, entry)
                assert arrays["histogram"]["density"].shape == (100,)
                assert (arrays["mean_map"] is None) == (len(entry["shape"]) == 1)
        assert (folders.logs / "Layers.png").is_file()
        assert not folders.analysis_partial.exists()
        assert not temporary_files(folders.logs, folders.weights)


def test_a_trained_teacher_separates_classes_better_at_its_logits_than_at_its_stem(analysed: SweepRun) -> None:
    """resnet20 trained 2 epochs on digits: the classes pull apart with depth (the tunnel's first half)."""
    numbers = json.loads(StageFolders(analysed.root, analysed.plan.experiments[0].teacher_analyze_stage)
                         .analysis_numbers.read_text())
    taps = numbers["splits"]["train"]["taps"]
    assert taps["fc"]["geometry"]["separation"] > taps["stem"]["geometry"]["separation"]


def test_a_stage_killed_after_some_taps_goes_on_from_them_and_leaves_no_scratch(
        analysed: SweepRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_torch_threads: None) -> None:
    """Killed after two taps, the stage resumes with the checkpointed taps kept (not analysed again),
    gets every number of the uninterrupted run, and leaves no temporary feature files behind."""
    import tempfile

    from stages import run_stage
    from stages import analyze as analyze_module

    spec = analyze_stages(analysed.plan)[0]
    copy_stage(analysed.root, tmp_path / "out", spec.upstream["model"])
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    folders = StageFolders(tmp_path / "out", spec.name)
    calls = []
    original = analyze_module.analyse_tap

    def dying(*args: Any, **kwargs: Any) -> dict:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed after two taps")
        return original(*args, **kwargs)

    monkeypatch.setattr(analyze_module, "analyse_tap", dying)
    with pytest.raises(KeyboardInterrupt):
        run_stage(spec, tmp_path / "out")
    partial = pickle.loads(folders.analysis_partial.read_bytes())
    assert len(partial["splits"]["train"]) == 2
    assert not list(scratch.iterdir()), "the scratch folder goes with the exception"
    calls.clear()
    monkeypatch.setattr(analyze_module, "analyse_tap", lambda *args, **kwargs: (calls.append(1), original(*args, **kwargs))[1])
    assert run_stage(spec, tmp_path / "out") == "done"
    taps = len(json.loads(folders.analysis_numbers.read_text())["taps"])
    assert len(calls) == 2 * taps - 2, "the two checkpointed taps are not analysed again"
    ours = json.loads(folders.analysis_numbers.read_text())["splits"]
    theirs = json.loads(StageFolders(analysed.root, spec.name).analysis_numbers.read_text())["splits"]
    assert ours == theirs
    assert not list(scratch.iterdir()) and not folders.analysis_partial.exists()


def test_a_partial_from_other_weights_is_not_resumed(analysed: SweepRun, tmp_path: Path, restore_torch_threads: None) -> None:
    from pipeline.store import write_pickle
    from stages import run_stage

    spec = analyze_stages(analysed.plan)[0]
    copy_stage(analysed.root, tmp_path, spec.upstream["model"])
    folders = StageFolders(tmp_path, spec.name)
    stale = {"upstream": "sha256 of another DONE", "splits": {"train": {"stem": {"shape": [0], "stats": "stale"}}}}
    write_pickle(folders.analysis_partial, stale)
    assert run_stage(spec, tmp_path) == "done"
    numbers = json.loads(folders.analysis_numbers.read_text())
    assert numbers["splits"] == json.loads(StageFolders(analysed.root, spec.name).analysis_numbers.read_text())["splits"]


def test_a_stage_records_what_each_asked_tap_resolved_to(analysed: SweepRun, tmp_path: Path, restore_torch_threads: None) -> None:
    """What ``report`` pairs a teacher's asked taps with a student's by: index or name, repeats kept."""
    from stages import run_stage

    sweep = write_sweep(tmp_path / "asked.yaml", {"defaults.analysis": {"stats": True, "samples": 50, "splits": ["test"],
                                                                        "taps": [2, "layer1", 2]}})
    spec = next(stage for stage in analyze_stages(build_plan(sweep)) if stage.settings["role"] == "teacher")
    copy_stage(analysed.root, tmp_path / "out", spec.upstream["model"])
    assert run_stage(spec, tmp_path / "out") == "done"
    numbers = json.loads(StageFolders(tmp_path / "out", spec.name).analysis_numbers.read_text())
    from models.registry import build_model
    from models.taps import generalised_layers

    second = generalised_layers(build_model(spec.settings["arch"], 10, (1, 8, 8)))[2]
    assert numbers["taps_asked"] == [2, "layer1", 2]
    assert numbers["asked_tap_modules"] == [second, "layer1", second]
    assert numbers["taps"] == [second, "layer1"], "each module analysed once, in forward order"


def test_report_shows_layer_quality_and_student_minus_teacher_statistics(analysed: SweepRun) -> None:
    result = run_runner("report", str(analysed.sweep), "--root", str(analysed.root))
    assert result.returncode == 0, result.stderr
    assert "## Layer quality of the teachers" in result.stdout
    assert "## Feature statistics, student − teacher" in result.stdout
    lines = [line for line in result.stdout.splitlines() if line.startswith("| kd |") or line.startswith("| vanilla |")]
    assert len(lines) == 2, result.stdout
    out = analysed.root / "logs" / "report-tiny"
    assert "## Layer quality" in (out / "report.md").read_text()
    assert (out / "statistics-digits-resnet20-resnet8x0.25.png").is_file()
    assert list((out / "taps-digits-resnet20-resnet8x0.25-kd").glob("Tap-*.png"))


def test_student_minus_teacher_compares_a_larger_map_at_the_smaller_size() -> None:
    from pipeline.analysis_report import tap_differences

    stats = lambda value: {key: value for key in ("std", "cv", "skew", "excess_kurtosis", "iqr",  # noqa: E731
                                                   "wavelet_high_ratio", "spectral_entropy", "lowpass_residual_ratio")}
    teacher = {"taps": ["a", "b", "c", "d"], "taps_asked": ["a", "b", "c", "d"], "splits": {"train": {"taps": {
        "a": {"shape": [8, 16, 16], "stats": stats(5.0), "stats_at": {"8x8": stats(3.0)}},
        "b": {"shape": [8, 6, 6], "stats": stats(5.0), "stats_at": {"3x3": stats(3.0)}},
        "c": {"shape": [4], "stats": stats(2.0), "stats_at": {}},
        "d": {"shape": [4], "stats": None, "stats_at": {}}}}}}
    student = {"taps": ["a", "b", "c", "d"], "taps_asked": ["a", "b", "c", "d"], "splits": {"train": {"taps": {
        "a": {"shape": [4, 8, 8], "stats": stats(1.0), "stats_at": {}},
        "b": {"shape": [4, 4, 4], "stats": stats(1.0), "stats_at": {}},
        "c": {"shape": [4], "stats": stats(1.5), "stats_at": {}},
        "d": {"shape": [4], "stats": None, "stats_at": {}}}}}}
    differences, skipped = tap_differences(student, teacher, "train")
    assert differences["a", "a"]["std"] == pytest.approx(1.0 - 3.0), "the teacher's 16x16 taken at the student's 8x8"
    assert differences["c", "c"]["iqr"] == pytest.approx(-0.5)
    assert ("b", "b") not in differences and skipped == 1, "6x6 against 4x4: no halving matches; d has no statistics"


def test_every_layer_runs_compare_only_top_level_layers_but_the_logits() -> None:
    """resnet56 vs resnet20: layer1.0 is the first of 9 blocks in one and of 3 in the other."""
    from pipeline.analysis_report import compared_taps

    teacher = {"taps": ["stem", "layer1.0", "layer1.1", "layer1", "pool", "fc"], "taps_asked": None}
    student = {"taps": ["stem", "layer1.0", "layer1", "pool", "fc"], "taps_asked": None}
    assert compared_taps(student, teacher) == [("stem", "stem"), ("layer1", "layer1"), ("pool", "pool")]
    named = {"taps": ["layer1.0", "fc"], "taps_asked": ["layer1.0", "fc"], "asked_tap_modules": ["layer1.0", "fc"]}
    assert compared_taps({**student, **named}, {**teacher, **named}) == [("layer1.0", "layer1.0"), ("fc", "fc")], \
        "named taps: all of them"


def test_asked_taps_pair_up_in_order_across_architectures() -> None:
    """``taps: [1, 2, 3]`` on resnet20 -> vgg8: each model's generalised layers 1, 2 and 3, whatever their
    names, as fitnet pairs teacher_tap with student_tap; one module asked twice is compared once."""
    from pipeline.analysis_report import compared_taps

    asked = [1, 2, 3, 2]
    teacher = {"taps": ["layer1.0", "layer1.1", "layer1"], "taps_asked": asked,
               "asked_tap_modules": ["layer1.0", "layer1.1", "layer1", "layer1.1"]}
    student = {"taps": ["layer1", "layer2", "layer3"], "taps_asked": asked,
               "asked_tap_modules": ["layer1", "layer2", "layer3", "layer2"]}
    assert compared_taps(student, teacher) == [("layer1.0", "layer1"), ("layer1.1", "layer2"), ("layer1", "layer3")]
    before = {key: value for key, value in student.items() if key != "asked_tap_modules"}
    assert compared_taps(before, teacher) == [("layer1", "layer1")], "a stage from before the record kept them: shared names"


def test_layers_quality_prints_a_teacher_taps_line_the_feature_only_method_accepts(analysed: SweepRun, tmp_path: Path) -> None:
    result = run_runner("layers-quality", str(analysed.sweep), "--root", str(analysed.root), "--top", "2")
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("teacher_taps:"))
    taps = yaml_list(line)
    assert len(taps) == 2
    ranked = [row.split()[1] for row in result.stdout.splitlines() if row.strip()[:1].isdigit()]
    maps = [tap for tap in ranked if tap not in ("pool", "fc")]  # resnet20's two vector taps
    assert set(taps) == set(maps[:2])
    numbers = json.loads(StageFolders(analysed.root, analysed.plan.experiments[0].teacher_analyze_stage)
                         .analysis_numbers.read_text())
    assert taps == [tap for tap in numbers["taps"] if tap in taps], "forward order"
    sweep = write_sweep(tmp_path / "feature_only.yaml", {
        "axes.method": ["feature_only"],
        "defaults.methods": {"feature_only": {"teacher_taps": taps, "student_taps": ["layer2", "layer3"]}},
    })
    plan = build_plan(sweep)
    student = next(spec for spec in plan.stages.values() if spec.kind == "train_student")
    assert student.settings["method"]["params"]["teacher_taps"] == taps
    from pipeline.catalogue import load_catalogue
    from stages.preflight import check_plan

    check_plan(plan, load_catalogue(), [student.name])  # the method builds on these taps' shapes


def test_layers_quality_says_when_the_sweep_analyses_no_teacher(tmp_path: Path) -> None:
    result = run_runner("layers-quality", str(write_sweep(tmp_path / "plain.yaml")), "--root", str(tmp_path))
    assert result.returncode == 2
    assert "defaults.analysis" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def yaml_list(line: str) -> list:
    import yaml

    return yaml.safe_load(line)["teacher_taps"]
