"""The ``prepare_data`` stage: a folder data set is decoded once, and every stage reads that file.

The sweep runs on a Tiny ImageNet folder in its official layout (``tests/test_imagefolder.py``
writes it: 200 classes, 2 training and 1 validation JPEG each).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import data.imagefolder
from pipeline.catalogue import load_catalogue
from pipeline.plan import build_plan, expand
from pipeline.store import StageFolders, read_pickle
from pipeline.sweep import load_sweep
from tests.conftest import write_sweep
from tests.test_imagefolder import write_tiny_imagenet


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny_root")
    write_tiny_imagenet(root)
    return root


def _sweep(folder: Path, data_root: Path, split_seeds: list[int]) -> Path:
    return write_sweep(folder / "tiny_imagenet.yaml", {
        "data_root": str(data_root),
        "axes": {"dataset": ["tinyimagenet"], "pair": ["resnet8x0.25:resnet8x0.25"], "method": ["vanilla", "kd"],
                 "seed": [0], "data.split_seed": split_seeds},
        "defaults.teacher.epochs": 1,
        "defaults.student.epochs": 1,
        "defaults.data": {"val_fraction": 0.25},
        "resources.default.cpus": 2,
    })


def test_one_prepare_data_stage_feeds_every_stage_that_reads_the_data_set(tmp_path: Path, tiny_root: Path) -> None:
    plan = build_plan(_sweep(tmp_path, tiny_root, [0, 1]))
    prepared = [spec for spec in plan.stages.values() if spec.kind == "prepare_data"]
    assert len(prepared) == 1  # both split seeds share it: it holds the official parts, not a split
    assert prepared[0].settings == {"dataset": {"name": "tinyimagenet", "fingerprint": plan.stages[
        plan.experiments[0].teacher_stage].settings["dataset"]["fingerprint"]}}
    assert list(plan.stages)[0] == prepared[0].name  # first in plan order, as every stage waits on it
    readers = [spec for spec in plan.stages.values() if spec.kind != "prepare_data"]
    assert {spec.kind for spec in readers} == {"train_teacher", "train_student", "evaluate"}
    assert all(spec.upstream["data"] == prepared[0].name for spec in readers)


def test_the_data_stage_stays_out_of_the_hashes_of_the_stages_that_read_it(tmp_path: Path, tiny_root: Path) -> None:
    """Its identity, the fingerprint, is in their settings already; so hashes are those of a
    catalogue without the stage, and CIFAR sweeps planned before it existed keep theirs."""
    catalogue = load_catalogue()
    sweep = load_sweep(_sweep(tmp_path, tiny_root, [0]), catalogue)
    unprepared = replace(catalogue, datasets={
        **catalogue.datasets, "tinyimagenet": replace(catalogue.datasets["tinyimagenet"], prepared=False)})
    with_stage, without = expand(sweep, catalogue), expand(sweep, unprepared)
    assert len(with_stage.stages) == len(without.stages) + 1
    assert {spec.hash for spec in with_stage.stages.values() if spec.kind != "prepare_data"} == {
        spec.hash for spec in without.stages.values()}
    assert not any(spec.kind == "prepare_data" for spec in build_plan(write_sweep(tmp_path / "digits.yaml")).stages.values())


def test_stages_train_from_the_decoded_file_without_the_jpegs(tmp_path: Path, restore_torch_threads: None) -> None:
    """Once prepare_data is DONE, the other stages read only its file: they train with the JPEG
    folder gone, which also shows they neither decode nor fingerprint it again."""
    from stages import run_stage
    from stages.prepare_data import load_prepared

    data_root = tmp_path / "data"
    write_tiny_imagenet(data_root)
    plan = build_plan(_sweep(tmp_path, data_root, [0]))
    root = tmp_path / "out"
    prepare = next(spec for spec in plan.stages.values() if spec.kind == "prepare_data")
    assert run_stage(prepare, root) == "done"
    raw = load_prepared(StageFolders(root, prepare.name).prepared_images)
    direct = data.imagefolder.read("tinyimagenet", str(data_root))
    for part in ("train_images", "train_labels", "test_images", "test_labels"):
        assert np.array_equal(getattr(raw, part), getattr(direct, part))
    assert raw.train_images.dtype == np.uint8 and raw.train_images.shape == (400, 3, 64, 64)

    data_root.rename(tmp_path / "moved_away")
    for spec in plan.stages.values():
        if spec.kind != "prepare_data":
            assert run_stage(spec, root) == "done", spec.name
    assert run_stage(prepare, root) == "skipped"
    epochs = read_pickle(StageFolders(root, plan.experiments[0].teacher_stage).log)["epochs"]
    assert len(epochs) == 1 and epochs[0]["train_loss"] > 0


def test_preflight_refuses_a_damaged_image_before_anything_is_queued(tmp_path: Path) -> None:
    from pipeline.sweep import SweepError
    from stages.preflight import check_plan

    root = tmp_path / "data"
    folder = write_tiny_imagenet(root)
    sweep = _sweep(tmp_path, root, [0])
    check_plan(build_plan(sweep), load_catalogue())  # whole files pass
    victim = sorted((folder / "train").glob("*/images/*_1.JPEG"))[3]
    victim.write_bytes(victim.read_bytes()[:-200])  # a download cut short
    with pytest.raises(SweepError, match=rf"data_root: tinyimagenet: {victim} is a truncated JPEG \(no end marker\); "
                                         r"replace or delete it, then .*runner.py data check tinyimagenet") as caught:
        check_plan(build_plan(sweep), load_catalogue())
    assert "\n" not in str(caught.value)


def test_damaged_image_tells_whole_files_from_cut_empty_and_foreign_ones(tmp_path: Path) -> None:
    from torchvision.io import encode_jpeg, encode_png

    from data.layouts import damaged_image

    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    files = {
        "whole.JPEG": encode_jpeg(image).numpy().tobytes(),
        "padded.JPEG": encode_jpeg(image).numpy().tobytes() + b"\x00" * 100,  # bytes after the end marker
        "png_named_jpeg.JPEG": encode_png(image).numpy().tobytes(),  # as a few of ImageNet's train files are
        "cut.JPEG": encode_jpeg(image).numpy().tobytes()[:-10],
        "cut.png": encode_png(image).numpy().tobytes()[:-4],
        "error_page.JPEG": b"<html><body>404 Not Found</body></html>",
        "empty.JPEG": b"",
    }
    for name, data_bytes in files.items():
        (tmp_path / name).write_bytes(data_bytes)
    found = {name: damaged_image(tmp_path / name) for name in files}
    assert found["whole.JPEG"] is found["padded.JPEG"] is found["png_named_jpeg.JPEG"] is None
    assert found["cut.JPEG"] == "is a truncated JPEG (no end marker)"
    assert found["cut.png"] == "is a truncated PNG (no end marker)"
    assert found["error_page.JPEG"].startswith("is not an image file")
    assert found["empty.JPEG"] == "is empty"
