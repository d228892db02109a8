"""Few-data training (``data.subset_size``): a seeded, stratified subset of the training split."""
from __future__ import annotations

import itertools
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from data.digits import read as read_digits
from data.errors import DatasetError
from data.registry import load_dataset
from data.splits import stratified_holdout, stratified_subset, subset_counts
from pipeline.plan import build_plan
from pipeline.sweep import SweepError
from stages.loading import load_stage_data

DIGITS_TRAIN = 1294  # digits' training split at val_fraction 0.1: 1797 - 359 test - 144 validation


def _pixel_keys(images: torch.Tensor) -> set[bytes]:
    """Each image as the bytes of its pixels: an identity that survives the split."""
    return {image.tobytes() for image in images.numpy()}


def _largest_remainders(class_sizes: list[int], size: int) -> list[int]:
    """Each class's share of ``size``, worked out exactly: floors, then one more for the largest
    remainders (ties to the smaller label)."""
    total = sum(class_sizes)
    shares = [Fraction(size * n, total) for n in class_sizes]
    counts = [int(share) for share in shares]
    by_remainder = sorted(range(len(shares)), key=lambda c: (-(shares[c] - counts[c]), c))
    for c in by_remainder[:size - sum(counts)]:
        counts[c] += 1
    return counts


def test_subset_counts_by_hand() -> None:
    sizes = np.array([3, 10, 17, 40, 1])  # N = 71
    # 20 * sizes / 71 = 0.85, 2.82, 4.79, 11.27, 0.28: floors 0, 2, 4, 11, 0; the three largest
    # remainders (classes 0, 1, 2) round up; class 4 rounds to none, so it gets one, taken from
    # class 2, the class then furthest above its share (5 - 4.79).
    assert subset_counts(sizes, 20).tolist() == [1, 3, 4, 11, 1]
    # 3 * sizes / 71 = 0.13, 0.42, 0.72, 1.69, 0.04: fewer images than classes, so no class is lifted.
    assert subset_counts(sizes, 3).tolist() == [0, 0, 1, 2, 0]
    # Ten images of ten unequal classes: one each.
    assert subset_counts(np.array([5, 1, 1, 1, 1, 1, 1, 1, 1, 30]), 10).tolist() == [1] * 10


@pytest.mark.parametrize("size", [10, 37, 200, 1000])
def test_digits_subset_has_the_size_and_each_class_its_share(size: int) -> None:
    full, data = load_dataset("digits", None, 0.1, 0), load_dataset("digits", None, 0.1, 0, subset_size=size)
    assert len(data.train_labels) == len(data.train_images) == size
    class_sizes = torch.bincount(full.train_labels).tolist()
    assert torch.bincount(data.train_labels, minlength=10).tolist() == _largest_remainders(class_sizes, size)


def test_subset_is_drawn_from_the_training_split_and_leaves_validation_and_test_alone() -> None:
    full, data = load_dataset("digits", None, 0.1, 3), load_dataset("digits", None, 0.1, 3, subset_size=100)
    subset = _pixel_keys(data.train_images)
    assert len(subset) == 100
    assert subset <= _pixel_keys(full.train_images)
    assert not subset & _pixel_keys(full.val_images)
    for name in ("val_images", "val_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(data, name), getattr(full, name))
    # The statistics stay the whole training split's, so the teacher's inputs are normalised as in its training.
    assert (data.channel_mean, data.channel_std) == (full.channel_mean, full.channel_std)


def test_same_seed_same_images_other_seed_other_images() -> None:
    first, again, other = (load_dataset("digits", None, 0.1, seed, subset_size=100) for seed in (4, 4, 5))
    assert torch.equal(first.train_images, again.train_images) and torch.equal(first.train_labels, again.train_labels)
    assert _pixel_keys(first.train_images) != _pixel_keys(other.train_images)


def test_subset_is_not_the_images_next_in_line_for_validation() -> None:
    """The subset's keys are salted apart from the hold-out's: the subset drawn with val_fraction 0
    is not mostly the images a validation split of the same seed would take."""
    labels = read_digits("digits", None).train_labels
    held = set(stratified_holdout(labels, 0.1, 0)[1].tolist())
    subset = set(stratified_subset(labels, np.arange(len(labels)), len(held), 0).tolist())
    assert len(subset & held) < len(held) // 2


def test_subsets_of_equal_classes_are_nested() -> None:
    labels = np.repeat(np.arange(10), 45)
    ids = np.arange(100, 100 + len(labels))
    drawn = [set(ids[stratified_subset(labels, ids, size, 2)].tolist()) for size in range(1, len(labels) + 1)]
    assert all(smaller <= larger for smaller, larger in itertools.pairwise(drawn))


def test_the_draw_follows_the_image_ids_not_their_positions() -> None:
    labels = np.repeat(np.arange(4), [20, 30, 25, 25])
    ids = np.arange(1000, 1100)
    shuffled = np.random.default_rng(0).permutation(len(labels))
    chosen = ids[stratified_subset(labels, ids, 30, 1)]
    chosen_shuffled = ids[shuffled][stratified_subset(labels[shuffled], ids[shuffled], 30, 1)]
    assert np.array_equal(np.sort(chosen), np.sort(chosen_shuffled))


@pytest.mark.parametrize("size", [DIGITS_TRAIN + 1, 0])
def test_a_subset_that_does_not_fit_is_refused_in_one_line(size: int) -> None:
    with pytest.raises(DatasetError) as raised:
        load_dataset("digits", None, 0.1, 0, subset_size=size)
    message = str(raised.value)
    assert "\n" not in message
    assert "data.subset_size" in message and f"{size}" in message
    assert f"{DIGITS_TRAIN} images" in message and f"1 to {DIGITS_TRAIN}" in message


def test_whole_training_split_is_the_same_as_no_subset() -> None:
    full, whole = load_dataset("digits", None, 0.1, 0), load_dataset("digits", None, 0.1, 0, subset_size=DIGITS_TRAIN)
    assert torch.equal(full.train_images, whole.train_images) and torch.equal(full.train_labels, whole.train_labels)


def _sweep(tmp_path: Path, subset_size: object) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "name": "few",
        "axes": {"dataset": ["digits"], "pair": ["resnet20:resnet8x0.25"], "method": ["vanilla"]},
        "defaults": {"data": {"subset_size": subset_size}},
    }))
    return path


def test_a_sweep_with_a_subset_plans_and_its_student_loads_the_subset(tmp_path: Path) -> None:
    plan = build_plan(_sweep(tmp_path, 200))
    [student] = [stage for stage in plan.stages.values() if stage.kind == "train_student"]
    data = load_stage_data(student)
    assert len(data.train_labels) == 200 and len(data.val_labels) == 144


def test_only_the_student_trains_on_the_subset_and_sweeps_without_one_keep_their_hashes(tmp_path: Path) -> None:
    def stage(subset_size: object, kind: str):
        folder = tmp_path / str(subset_size)
        folder.mkdir(exist_ok=True)
        return next(stage for stage in build_plan(_sweep(folder, subset_size)).stages.values() if stage.kind == kind)

    teacher = stage(200, "train_teacher")
    assert teacher.hash == stage(None, "train_teacher").hash and "subset_size" not in teacher.settings["dataset"]
    assert len(load_stage_data(teacher).train_labels) == DIGITS_TRAIN
    assert "subset_size" not in stage(None, "train_student").settings["dataset"]
    assert stage(201, "train_student").settings["dataset"]["subset_size"] == 201


def test_a_subset_larger_than_the_training_split_is_refused_at_plan_time(tmp_path: Path) -> None:
    with pytest.raises(SweepError, match=r"defaults\.data\.subset_size: 1295 is more than the 1294 images of digits's training split"):
        build_plan(_sweep(tmp_path, 1295))
    build_plan(_sweep(tmp_path, 1294))


@pytest.mark.parametrize("value", [0, 2.5, "many"])
def test_a_sweep_with_a_bad_subset_size_is_refused_naming_the_key(tmp_path: Path, value: object) -> None:
    with pytest.raises(SweepError, match="subset_size"):
        build_plan(_sweep(tmp_path, value))
