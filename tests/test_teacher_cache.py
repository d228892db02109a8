"""The teacher cache: a ``teacher_outputs`` stage runs the teacher once over the students' own batches,
and logit-only students read its file instead of running the teacher.

The students here are the tiny sweep's (digits, resnet20 -> resnet8x0.25), with the teacher copied
DONE from ``tiny_in_process``; the uncached kd student of that run is the reference.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.base import Batch, Method, MethodContext, ModelOutput
from pipeline.catalogue import load_catalogue
from pipeline.logfiles import read_log
from pipeline.plan import build_plan
from pipeline.store import StageFolders
from pipeline.sweep import SweepError
from stages import run_stage
from stages.context import StageRun
from stages.train_student import distillation_terms
from tests.conftest import SweepRun, copy_stage, stage_name, write_sweep

CACHED = {"defaults.teacher_cache": {"enabled": True, "dtype": "float32"}}


def _run_cached(tiny_in_process: SweepRun, folder, changes=None):
    """Plans the tiny sweep with the cache on, copies its teacher, runs the cache and student stages."""
    plan = build_plan(write_sweep(folder / "cached.yaml", {**CACHED, **(changes or {})}))
    root = folder / "out"
    copy_stage(tiny_in_process.root, root, stage_name(plan, "teacher_stage"))
    for spec in plan.stages.values():
        if spec.kind in ("teacher_outputs", "train_student"):
            run_stage(spec, root)
    return plan, root


def _outputs_stage(plan):
    return next(spec for spec in plan.stages.values() if spec.kind == "teacher_outputs")


def test_a_cached_kd_student_trains_bit_for_bit_as_the_uncached_one(
    tiny_in_process: SweepRun, tmp_path, restore_torch_threads
) -> None:
    plan, root = _run_cached(tiny_in_process, tmp_path)
    cached_student = stage_name(plan, "student_stage")
    assert plan.stages[cached_student].upstream["teacher_outputs"] == _outputs_stage(plan).name
    assert cached_student != stage_name(tiny_in_process.plan, "student_stage")  # its own hash
    # vanilla reads no teacher: it is the same stage, cache or not
    assert stage_name(plan, "student_stage", "vanilla") == stage_name(tiny_in_process.plan, "student_stage", "vanilla")

    cached = read_log(StageFolders(root, cached_student).logs)
    uncached = read_log(StageFolders(tiny_in_process.root, stage_name(tiny_in_process.plan, "student_stage")).logs)
    assert [entry["terms"] for entry in cached["epochs"]] == [entry["terms"] for entry in uncached["epochs"]]
    weights = torch.load(StageFolders(root, cached_student).final_weights, weights_only=False)["model"]
    reference = torch.load(StageFolders(tiny_in_process.root, stage_name(tiny_in_process.plan, "student_stage"))
                           .final_weights, weights_only=False)["model"]
    assert all(torch.equal(weights[key], reference[key]) for key in reference)


def test_the_cache_holds_each_epochs_logits_of_each_sample(tiny_in_process: SweepRun, tmp_path, restore_torch_threads) -> None:
    """Row e, sample i is the teacher's logits of sample i as epoch e augmented it: recomputed here
    from the same batches, and different between the two epochs (the crops differ)."""
    from stages.loading import load_classifier, load_stage_data
    from stages.training import TrainingSettings, training_batches

    plan, root = _run_cached(tiny_in_process, tmp_path)
    spec = _outputs_stage(plan)
    folders = StageFolders(root, spec.name)
    table = np.load(folders.teacher_logits)
    data = load_stage_data(spec, {"data": None} if "data" in spec.upstream else None)
    settings = TrainingSettings.from_settings(spec.settings["training"], seed=spec.settings["training"]["seed"])
    teacher = load_classifier(StageFolders(root, spec.upstream["teacher"]).final_weights, torch.device("cpu")).model
    assert table.shape == (2, len(data.train_labels), data.num_classes) and table.dtype == np.float32
    for epoch in range(2):
        images, _, indices = next(iter(training_batches(data, settings, epoch)))
        with torch.no_grad():
            assert torch.equal(torch.from_numpy(table[epoch, indices.numpy()]), teacher(images))
    assert not np.array_equal(table[0], table[1])
    log = read_log(folders.logs)
    assert log["rows"] == 2 and log["bytes"] == folders.teacher_logits.stat().st_size


def test_without_augmentation_one_row_serves_every_seed(tiny_in_process: SweepRun, tmp_path, restore_torch_threads) -> None:
    changes = {"axes.seed": [0, 1], "defaults.student.augment": False, "defaults.teacher_cache": {"enabled": True}}
    plan = build_plan(write_sweep(tmp_path / "once.yaml", changes))
    outputs = [spec for spec in plan.stages.values() if spec.kind == "teacher_outputs"]
    assert len(outputs) == 1 and "once" in outputs[0].name
    students = [spec for spec in plan.stages.values() if spec.kind == "train_student" and spec.upstream.get("teacher_outputs")]
    assert len(students) == 2
    root = tmp_path / "out"
    copy_stage(tiny_in_process.root, root, outputs[0].upstream["teacher"])
    run_stage(outputs[0], root)
    table = np.load(StageFolders(root, outputs[0].name).teacher_logits)
    assert table.shape[0] == 1 and table.dtype == np.float16 and np.isfinite(table).all()
    assert outputs[0].settings["bytes"] == table.nbytes
    for student in students:
        run_stage(student, root)
        assert StageFolders(root, student.name).is_done()


def _cache_files(folders: StageFolders) -> list:
    return [path for path in (folders.teacher_logits, *folders.teacher_top_k) if path.is_file()]


@pytest.mark.parametrize("top_k", [None, 9])
def test_an_interrupted_cache_goes_on_from_its_first_unfinished_row(
    tiny_in_process: SweepRun, tmp_path, restore_torch_threads, monkeypatch: pytest.MonkeyPatch, top_k
) -> None:
    cache = {"defaults.teacher_cache": {"enabled": True, "dtype": "float32", "top_k": top_k}}
    plan, root = _run_cached(tiny_in_process, tmp_path / "whole", cache)
    whole = [path.read_bytes() for path in _cache_files(StageFolders(root, _outputs_stage(plan).name))]
    assert len(whole) == (1 if top_k is None else 3)

    spec, other = _outputs_stage(plan), tmp_path / "interrupted"
    copy_stage(root, other, spec.upstream["teacher"])
    beats = []

    def stop_after_first_row(stage: StageRun) -> None:
        beats.append(1)
        if len(beats) == 1:
            raise KeyboardInterrupt("preempted")

    monkeypatch.setattr(StageRun, "heartbeat", stop_after_first_row)
    with pytest.raises(KeyboardInterrupt):
        run_stage(spec, other)
    folders = StageFolders(other, spec.name)
    assert not folders.is_done() and not _cache_files(folders)
    monkeypatch.undo()
    run_stage(spec, other)
    assert read_log(folders.logs)["resumed_at_row"] == 1
    assert folders.is_done() and [path.read_bytes() for path in _cache_files(folders)] == whole


def test_only_students_of_logit_methods_read_the_cache(tmp_path) -> None:
    plan = build_plan(write_sweep(tmp_path / "mixed.yaml", {**CACHED, "axes.method": ["kd", "fitnet", "kd+supcon"]}))
    reads = {spec.settings["method"]["name"]: "teacher_outputs" in spec.upstream
             for spec in plan.stages.values() if spec.kind == "train_student"}
    assert reads == {"kd": True, "fitnet": False, "kd+supcon": True}
    assert len([spec for spec in plan.stages.values() if spec.kind == "teacher_outputs"]) == 1


def test_a_cache_that_caches_nothing_or_too_much_is_refused(tmp_path) -> None:
    with pytest.raises(SweepError, match=r"nothing.yaml: defaults.teacher_cache.enabled: .*allowed: ckd, dist, dkd, kd"):
        build_plan(write_sweep(tmp_path / "nothing.yaml", {**CACHED, "axes.method": ["vanilla", "fitnet"]}))
    # 2 epochs x 1,294 training digits x 10 classes x 4 bytes = 103,520 bytes
    with pytest.raises(SweepError, match=r"big.yaml: defaults.teacher_cache.limit_gb: .*0.00 GB in 1 stage"):
        build_plan(write_sweep(tmp_path / "big.yaml", {"defaults.teacher_cache": {"enabled": True, "dtype": "float32",
                                                                                   "limit_gb": 0.0001}}))
    build_plan(write_sweep(tmp_path / "fits.yaml", {"defaults.teacher_cache": {"enabled": True, "dtype": "float32",
                                                                                "limit_gb": 0.000104}}))


def test_methods_that_read_only_the_teachers_outputs_keep_the_batch_and_tap_what_their_params_name() -> None:
    """What METHOD teacher_outputs_only promises and the cache relies on: the loader's batch (no
    prepare_batch), and teacher taps that the catalogue's tap params name (what the cache keeps)."""
    from distill.base import method_class
    from distill.composition import build_method
    from models.registry import tap_shapes
    from pipeline.plan import _listed, method_settings

    catalogue = load_catalogue()
    readers = {name: spec for name, spec in catalogue.methods.items() if spec.teacher_outputs_only}
    assert sorted(readers) == ["at", "ckd", "dist", "dkd", "feature_only", "fitnet", "kd", "vid"]
    assert sorted(name for name, spec in readers.items() if spec.logits_only) == ["ckd", "dist", "dkd", "kd"]
    shape = (3, 32, 32)
    context = MethodContext(num_classes=10, teacher_tap_shapes=tap_shapes("resnet20", shape, 10),
                            student_tap_shapes=tap_shapes("resnet20", shape, 10))
    for name, spec in readers.items():
        assert method_class(name).prepare_batch is Method.prepare_batch, name
        params = {key: field.default for key, field in spec.params.items()}
        method = build_method(method_settings(name, [spec], {name: params}), context)
        named = [tap for key in spec.teacher_tap_params for tap in _listed(params[key])]
        assert list(method.teacher_taps) == list(dict.fromkeys(named)), name


def test_a_cached_student_whose_method_changes_the_images_is_stopped() -> None:
    from stages.files import StageError

    class Mixing(Method):
        METHOD = {"name": "mixing", "uses_teacher": True}

        def prepare_batch(self, batch: Batch) -> Batch:
            return Batch(batch.images.flip(0), batch.labels, batch.epoch, batch.indices, batch.generator)

        def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
            return {"zero": student.logits.sum() * 0}

    class Logits:
        def outputs(self, epoch: int, indices: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, dict]:
            return torch.zeros(len(indices), 2), {}

    method = Mixing({}, MethodContext(num_classes=2, teacher_tap_shapes={}, student_tap_shapes={}))
    terms = distillation_terms(torch.nn.Linear(3, 2), None, method, Logits())
    with pytest.raises(StageError, match="changes the batch's images"):
        terms(torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64), 0, torch.arange(4), torch.Generator())


def test_plan_prints_the_cache_size_and_its_readers(tmp_path) -> None:
    from tests.conftest import run_runner

    sweep = write_sweep(tmp_path / "sized.yaml", {**CACHED, "axes.method": ["kd", "dkd", "fitnet"]})
    result = run_runner("plan", str(sweep))
    assert result.returncode == 0, result.stderr
    # 2 epochs x 1,294 training digits x 10 classes x 4 bytes
    assert "teacher cache: 0.1 MB in 1 teacher_outputs stage(s), read by 2 student(s)" in result.stdout


def test_a_cached_sweep_on_an_image_folder_scans_the_folder_once(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache's size needs the folder's training-image count; listing a large folder per
    experiment made planning a 40-experiment ImageNet-folder sweep take minutes."""
    import pipeline.catalogue
    from tests.test_imagefolder import write_split_folders

    scans = []
    counting = pipeline.catalogue.folder_facts
    monkeypatch.setattr(pipeline.catalogue, "folder_facts", lambda *args: scans.append(args) or counting(*args))
    folder = write_split_folders(tmp_path / "pets", ["cat", "dog", "owl"], per_class=2)
    plan = build_plan(write_sweep(tmp_path / "pets.yaml", {
        **CACHED, "data_root": str(folder), "defaults.data": {"val_fraction": 0.0},
        "axes": {"dataset": ["imagefolder"], "pair": ["resnet8x0.25:resnet8x0.25"], "method": ["kd", "dkd", "dist"],
                 "seed": [0, 1]},
    }))
    assert [spec.settings["bytes"] for spec in plan.stages.values() if spec.kind == "teacher_outputs"] == [2 * 6 * 3 * 4] * 2
    assert len(scans) == 1


def test_top_k_keeps_the_k_largest_logits_and_the_normaliser() -> None:
    """Hand-checked: logits (3, 1, 0, -1, 2) with k 2 keep 3 and 2; the other three classes each get
    log(mean(e^1, e^0, e^-1)) = log((e + 1 + 1/e) / 3), so the softmax at T 1 keeps p of the kept
    classes and the others' total mass."""
    from stages.teacher_outputs import top_k_with_fill

    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0, 2.0]])
    values, classes, fill = top_k_with_fill(logits, 2)
    assert values.tolist() == [[3.0, 2.0]] and classes.tolist() == [[0, 4]]
    assert fill.item() == pytest.approx(np.log((np.e + 1 + 1 / np.e) / 3), rel=1e-6)
    rebuilt = torch.full((1, 5), fill.item()).scatter(1, classes, values)
    true, kept = logits.softmax(1), rebuilt.softmax(1)
    assert kept[0, [0, 4]].tolist() == pytest.approx(true[0, [0, 4]].tolist(), rel=1e-6)
    assert kept[0, [1, 2, 3]].sum().item() == pytest.approx(true[0, [1, 2, 3]].sum().item(), rel=1e-6)
    values, classes, fill = top_k_with_fill(logits, 4)  # one other class: its own logit
    assert fill.item() == pytest.approx(-1.0, abs=1e-6)


def test_a_top_k_cache_of_all_classes_but_one_trains_the_uncached_student(
    tiny_in_process: SweepRun, tmp_path, restore_torch_threads
) -> None:
    """With k = C - 1 the stand-in is the last class's own logit, so in float32 nothing is lost: the
    kd student's loss terms are the uncached run's bit for bit, and the files are the planned size
    (past their 128-byte .npy headers): 2 epochs x 1,294 digits x (9 x (4 + 2) + 4) bytes."""
    cache = {"defaults.teacher_cache": {"enabled": True, "dtype": "float32", "top_k": 9}}
    plan, root = _run_cached(tiny_in_process, tmp_path, cache)
    outputs = StageFolders(root, _outputs_stage(plan).name)
    assert not outputs.teacher_logits.exists() and all(path.is_file() for path in outputs.teacher_top_k)
    assert sum(path.stat().st_size - 128 for path in outputs.teacher_top_k) == _outputs_stage(plan).settings["bytes"] == 2 * 1294 * 58
    assert read_log(outputs.logs)["top_k"] == 9
    cached = read_log(StageFolders(root, stage_name(plan, "student_stage")).logs)
    uncached = read_log(StageFolders(tiny_in_process.root, stage_name(tiny_in_process.plan, "student_stage")).logs)
    for ours, theirs in zip(cached["epochs"], uncached["epochs"]):
        assert ours["terms"] == theirs["terms"]
    assert _outputs_stage(plan).name != _outputs_stage(build_plan(write_sweep(tmp_path / "all.yaml", CACHED))).name


def test_top_k_of_every_class_is_refused(tmp_path) -> None:
    with pytest.raises(SweepError, match=r"defaults.teacher_cache.top_k: 10 keeps every one of digits's 10 classes; "
                                         r"set null to cache all logits; allowed: 1..9, null"):
        build_plan(write_sweep(tmp_path / "all.yaml", {"defaults.teacher_cache": {"enabled": True, "top_k": 10}}))


def test_cached_teacher_features_train_a_fitnet_student_bit_for_bit_as_its_teacher_does(
    tiny_in_process: SweepRun, tmp_path, restore_torch_threads
) -> None:
    """teacher_cache.features keeps the teacher's maps at fitnet's hint tap (float32, augmented,
    2 epochs): the student's terms and weights are those of the student that ran its teacher."""
    features = {"defaults.teacher_cache": {"enabled": True, "dtype": "float32", "features": True}, "axes.method": ["kd", "fitnet"]}
    plan, root = _run_cached(tiny_in_process, tmp_path / "cached", features)
    outputs = plan.stages[plan.stages[stage_name(plan, "student_stage", "fitnet")].upstream["teacher_outputs"]]
    assert outputs.settings["taps"] == ["layer2"] and "features" in outputs.name
    folders = StageFolders(root, outputs.name)
    [feature_file] = folders.teacher_features(1)
    assert np.load(feature_file, mmap_mode="r").shape == (2, 1294, 32, 4, 4)
    assert outputs.settings["bytes"] == sum(path.stat().st_size - 128 for path in (folders.teacher_logits, feature_file))

    uncached_plan = build_plan(write_sweep(tmp_path / "plain.yaml", {"axes.method": ["fitnet"]}))
    plain_root = tmp_path / "plain"
    copy_stage(tiny_in_process.root, plain_root, stage_name(uncached_plan, "teacher_stage", "fitnet"))
    student = uncached_plan.stages[stage_name(uncached_plan, "student_stage", "fitnet")]
    run_stage(student, plain_root)
    cached_name = stage_name(plan, "student_stage", "fitnet")
    assert plan.stages[cached_name].upstream["teacher_outputs"] == outputs.name
    cached = read_log(StageFolders(root, cached_name).logs)
    uncached = read_log(StageFolders(plain_root, student.name).logs)
    assert [entry["terms"] for entry in cached["epochs"]] == [entry["terms"] for entry in uncached["epochs"]]
    weights = torch.load(StageFolders(root, cached_name).final_weights, weights_only=False)["model"]
    reference = torch.load(StageFolders(plain_root, student.name).final_weights, weights_only=False)["model"]
    assert all(torch.equal(weights[key], reference[key]) for key in reference)


def test_feature_students_read_the_cache_only_when_features_are_asked(tmp_path) -> None:
    logits = build_plan(write_sweep(tmp_path / "logits.yaml", {**CACHED, "axes.method": ["kd", "fitnet", "at"]}))
    assert {spec.settings["method"]["name"] for spec in logits.stages.values()
            if spec.kind == "train_student" and "teacher_outputs" in spec.upstream} == {"kd"}
    with_features = build_plan(write_sweep(tmp_path / "features.yaml", {
        "defaults.teacher_cache": {"enabled": True, "features": True}, "defaults.student.augment": False,
        "axes.method": ["kd", "fitnet", "at", "at+kd", "crd"]}))
    caches = {spec.name: spec.settings.get("taps", []) for spec in with_features.stages.values() if spec.kind == "teacher_outputs"}
    assert sorted(caches.values()) == [[], ["layer1", "layer2", "layer3"], ["layer2"]]  # at and at+kd share theirs
    readers = [spec for spec in with_features.stages.values() if spec.kind == "train_student" and "teacher_outputs" in spec.upstream]
    assert sorted(spec.settings["method"]["name"] for spec in readers) == ["at", "at+kd", "fitnet", "kd"]


def test_the_cache_can_be_kept_to_some_methods(tmp_path) -> None:
    some = {"defaults.teacher_cache": {"enabled": True, "methods": ["kd", "kd+dist"]}, "axes.method": ["kd", "dkd", "kd+dist"]}
    plan = build_plan(write_sweep(tmp_path / "some.yaml", some))
    reads = {spec.settings["method"]["name"]: "teacher_outputs" in spec.upstream
             for spec in plan.stages.values() if spec.kind == "train_student"}
    assert reads == {"kd": True, "dkd": False, "kd+dist": True}
    with pytest.raises(SweepError, match=r"bad.yaml: defaults.teacher_cache.methods\[1\]: 'dist' is not on the method "
                                         r"axis; allowed: kd, dkd, kd\+dist"):
        build_plan(write_sweep(tmp_path / "bad.yaml", {**some, "defaults.teacher_cache": {"enabled": True, "methods": ["kd", "dist"]}}))
