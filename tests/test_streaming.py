"""Full ImageNet streams from its JPEG files (``data/streaming.py``) with the in-memory path's contract.

The folder is a real ILSVRC-2012 layout (``train/<wnid>/``, ``val/<wnid>/``, 1000 classes, one
image each), of small textured JPEGs of several sizes whose blue channel is flat at a value that
names the class, so an image can be matched to its label after any crop. ``IMAGENET_IN_MEMORY``
is lowered so that this cut counts as the full set.
"""
from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import encode_jpeg
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as F

from data import imagefolder
from data.registry import load_dataset
from data.streaming import StreamedSplits, random_resized_crop_box
from stages.training import TrainingSettings, predict, training_batches

WNIDS = [f"n{1_000_000 + 37 * index:08d}" for index in range(1000)]


def _blue(label: int) -> int:
    return 20 + 4 * (label % 50)


def _image(label: int) -> torch.Tensor:
    """A (3, H, W) uint8 image, H and W varying by label: red striped by row, green rising from left
    to right (so a mirrored view shows), blue flat at ``_blue(label)``."""
    height, width = 48 + 8 * (label % 5), 64 + 12 * (label % 3)
    rows, columns = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([
        (rows * 9 + label) % 256, columns * 250 // (width - 1), torch.full_like(rows, _blue(label)),
    ]).to(torch.uint8)


def write_imagenet(root: Path) -> Path:
    for part in ("train", "val"):
        for label, wnid in enumerate(WNIDS):
            folder = root / part / wnid
            folder.mkdir(parents=True)
            (folder / f"{wnid}_{part}.JPEG").write_bytes(encode_jpeg(_image(label), quality=95).numpy().tobytes())
    return root


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_imagenet(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture
def streamed(imagenet_root: Path, monkeypatch: pytest.MonkeyPatch) -> StreamedSplits:
    monkeypatch.setattr(imagefolder, "IMAGENET_IN_MEMORY", 10)
    data = load_dataset("imagenet", str(imagenet_root), 0.1, split_seed=3, subset_size=120)
    assert isinstance(data, StreamedSplits)
    return replace(data, workers=2)


def _settings(augment: bool = True) -> TrainingSettings:
    return TrainingSettings(
        epochs=2, batch_size=32, lr=0.1, optimizer="sgd", momentum=0.9, nesterov=False, betas=None,
        weight_decay=0.0, lr_schedule="cosine", warmup_epochs=0, pct_start=0.3, milestones=None, gamma=0.1,
        augment=augment, seed=5,
    )


def _blue_means(images: torch.Tensor, data: StreamedSplits) -> torch.Tensor:
    """The blue channel's mean per image of a normalised batch, back in pixel units."""
    return images[:, 2].mean(dim=(1, 2)) * data.channel_std[2] + data.channel_mean[2]


def test_streamed_splits_are_the_in_memory_splits_of_the_same_folder(
    imagenet_root: Path, streamed: StreamedSplits, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stratified hold-out and subset do not depend on how the images are held."""
    monkeypatch.setattr(imagefolder, "IMAGENET_IN_MEMORY", 1000)
    in_memory = load_dataset("imagenet", str(imagenet_root), 0.1, split_seed=3, subset_size=120)
    assert not isinstance(in_memory, StreamedSplits)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(streamed, f"{split}_labels"), getattr(in_memory, f"{split}_labels")), split
    assert (len(streamed.train_labels), len(streamed.val_labels), len(streamed.test_labels)) == (120, 100, 1000)
    assert streamed.image_shape == (3, 224, 224) and streamed.num_classes == 1000


def test_a_streamed_epoch_is_a_pure_function_of_seed_and_epoch(streamed: StreamedSplits) -> None:
    """Same batches with 2 workers or none, and on a second pass (a requeued epoch); another epoch differs."""
    first = list(training_batches(streamed, _settings(), epoch=0))
    for again in (list(training_batches(replace(streamed, workers=0), _settings(), epoch=0)),
                  list(training_batches(streamed, _settings(), epoch=0))):
        assert len(again) == len(first) == 4
        for (images, labels, indices), (images_again, labels_again, indices_again) in zip(first, again):
            assert torch.equal(images, images_again) and torch.equal(labels, labels_again)
            assert torch.equal(indices, indices_again)
    other = list(training_batches(streamed, _settings(), epoch=1))
    assert not torch.equal(first[0][2], other[0][2])


def test_every_streamed_image_carries_its_own_label(streamed: StreamedSplits) -> None:
    seen = []
    for images, labels, indices in training_batches(streamed, _settings(), epoch=0):
        assert images.shape[1:] == (3, 224, 224) and images.dtype == torch.float32
        assert torch.equal(labels, streamed.train_labels[indices])
        expected = torch.tensor([float(_blue(label)) for label in labels.tolist()])
        assert (_blue_means(images, streamed) - expected).abs().max() < 4
        seen.extend(indices.tolist())
    assert sorted(seen) == list(range(120))


def test_training_views_are_random_resized_crops_and_flips_and_evaluation_a_centre_crop(
    imagenet_root: Path, streamed: StreamedSplits,
) -> None:
    """Evaluation: shorter side to 256, centre 224 (torchvision's ImageNet recipe), computed here
    by hand; training: crops of varying scale and aspect, about half of them mirrored."""
    test_images = torch.cat(list(streamed.split_images("test", 200)))
    assert test_images.dtype == torch.uint8 and test_images.shape == (1000, 3, 224, 224)
    for label in (0, 7, 999):
        decoded = imagefolder.decode_file(imagenet_root / "val" / WNIDS[label] / f"{WNIDS[label]}_val.JPEG")
        expected = F.center_crop(F.resize(decoded, 256, antialias=True), [224, 224])
        assert torch.equal(test_images[label], expected)

    in_process, first = replace(streamed, workers=0), torch.zeros(1, dtype=torch.int64)
    views = torch.cat([next(in_process.epoch_images(first, 1, torch.Generator().manual_seed(epoch))) for epoch in range(64)]).float()
    unaugmented = next(in_process.epoch_images(first, 1, None)).float()
    assert len({view.sum().item() for view in views}) == 64  # each epoch's draw a different crop
    green_slope = views[:, 1, :, 1:].sub(views[:, 1, :, :-1]).mean(dim=(1, 2))
    mirrored = (green_slope < 0).sum().item()
    assert 16 <= mirrored <= 48
    assert not torch.equal(views[0], unaugmented[0])


def test_streaming_leaves_the_callers_random_stream_alone(streamed: StreamedSplits) -> None:
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    list(replace(streamed, workers=0).epoch_images(torch.arange(8), 4, torch.Generator().manual_seed(0)))
    assert torch.equal(torch.rand(3), expected)


def test_predict_reads_streamed_splits_in_order(streamed: StreamedSplits) -> None:
    """A model that answers with the blue channel's class names every validation image correctly."""

    class BlueReader(torch.nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            blue = _blue_means(images, streamed)
            centres = torch.tensor([float(_blue(label)) for label in range(1000)])
            return -(blue[:, None] - centres[None, :]).abs()  # ties: argmax takes the first, a label below 50

    logits = predict(BlueReader(), streamed.split_images("val", 64), torch.device("cpu"), streamed.normalise)
    assert logits.shape == (100, 1000)
    assert torch.equal(logits.argmax(1), streamed.val_labels % 50)


def test_prepare_data_lists_a_streamed_set_once_and_stages_read_it_where_their_node_mounts_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_torch_threads: None,
) -> None:
    from pipeline.plan import build_plan
    from pipeline.store import StageFolders, read_pickle
    from stages import run_stage
    from stages.prepare_data import load_prepared
    from tests.conftest import write_sweep

    monkeypatch.setattr(imagefolder, "IMAGENET_IN_MEMORY", 10)
    data_root = write_imagenet(tmp_path / "mounted_here")
    plan = build_plan(write_sweep(tmp_path / "imagenet.yaml", {
        "data_root": str(data_root), "axes.dataset": ["imagenet"], "axes.pair": ["mobilenet_v2:resnet8x0.25"],
    }))
    prepare = next(spec for spec in plan.stages.values() if spec.kind == "prepare_data")
    assert run_stage(prepare, tmp_path / "out") == "done"
    folders = StageFolders(tmp_path / "out", prepare.name)
    assert read_pickle(folders.log)["streamed"] is True
    listed = load_prepared(folders.prepared_images)
    assert len(listed.train_paths) == len(listed.train_labels) == 1000 and listed.folder == data_root

    elsewhere = data_root.rename(tmp_path / "mounted_there")
    data = load_dataset("imagenet", str(elsewhere), 0.1, 0, official_parts=listed)
    assert isinstance(data, StreamedSplits) and data.parts.folder == elsewhere
    first = next(replace(data, workers=0).split_images("test", 4))
    assert first.shape == (4, 3, 224, 224)


def test_random_resized_crop_boxes_follow_the_inception_recipe() -> None:
    """Area a uniform 8-100% of the image's, aspect log-uniform in [3/4, 4/3], inside the image;
    where no draw fits (a 10x1000 strip), the centred widest crop of aspect 4/3."""
    rng = random.Random(0)
    boxes = [random_resized_crop_box(375, 500, rng) for _ in range(4000)]
    areas, aspects = [], []
    for top, left, height, width in boxes:
        assert 0 <= top <= 375 - height and 0 <= left <= 500 - width
        areas.append(height * width / (375 * 500))
        aspects.append(width / height)
    assert 0.08 - 0.01 <= min(areas) and max(areas) <= 1.0
    assert min(aspects) >= 0.75 * 0.97 and max(aspects) <= 4 / 3 * 1.03
    # The same distribution as torchvision's own draws (large crops that do not fit are drawn
    # again, so the mean area is below the uniform's 0.54): means within sampling error.
    torch.manual_seed(0)
    theirs = [RandomResizedCrop.get_params(torch.empty(3, 375, 500), [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(4000)]
    their_areas = [height * width / (375 * 500) for _, _, height, width in theirs]
    their_aspects = [width / height for _, _, height, width in theirs]
    assert abs(np.mean(areas) - np.mean(their_areas)) < 0.02
    assert abs(np.mean(np.log(aspects)) - np.mean(np.log(their_aspects))) < 0.02
    assert abs(np.mean([top for top, _, _, _ in boxes]) - np.mean([top for top, _, _, _ in theirs])) < 5
    assert random_resized_crop_box(10, 1000, random.Random(0)) == (0, 493, 10, 13)
    assert random_resized_crop_box(375, 500, random.Random(5)) == random_resized_crop_box(375, 500, random.Random(5))
