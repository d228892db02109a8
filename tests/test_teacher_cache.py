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


def test_an_interrupted_cache_goes_on_from_its_first_unfinished_row(
    tiny_in_process: SweepRun, tmp_path, restore_torch_threads, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan, root = _run_cached(tiny_in_process, tmp_path / "whole")
    whole = StageFolders(root, _outputs_stage(plan).name).teacher_logits.read_bytes()

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
    assert not folders.is_done() and not folders.teacher_logits.exists()
    monkeypatch.undo()
    run_stage(spec, other)
    assert read_log(folders.logs)["resumed_at_row"] == 1
    assert folders.is_done() and folders.teacher_logits.read_bytes() == whole


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


def test_logit_only_methods_read_no_taps_and_keep_the_batch() -> None:
    from distill.base import method_class

    logit_only = [name for name, spec in load_catalogue().methods.items() if spec.teacher_logits_only]
    assert sorted(logit_only) == ["ckd", "dist", "dkd", "kd"]
    for name in logit_only:
        cls = method_class(name)
        assert cls.prepare_batch is Method.prepare_batch and cls.teacher_taps is Method.teacher_taps, name


def test_a_cached_student_whose_method_changes_the_images_is_stopped() -> None:
    from stages.files import StageError

    class Mixing(Method):
        METHOD = {"name": "mixing", "uses_teacher": True}

        def prepare_batch(self, batch: Batch) -> Batch:
            return Batch(batch.images.flip(0), batch.labels, batch.epoch, batch.indices, batch.generator)

        def loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
            return {"zero": student.logits.sum() * 0}

    class Logits:
        def batch(self, epoch: int, indices: torch.Tensor, device: torch.device) -> torch.Tensor:
            return torch.zeros(len(indices), 2)

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
