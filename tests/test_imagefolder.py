"""The ImageNet-family readers on tiny folders written in each real layout, and ``data check``.

Every image is a flat colour whose red level encodes its class index (``_red``), so a label that
is paired with the wrong image shows; JPEG moves flat colours by a level or two, far less than
the spacing of the levels.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import encode_jpeg, encode_png

from data import files, imagefolder, layouts
from data.check import check_data
from data.errors import DatasetCorruptError, DatasetError, DatasetNotFoundError
from data.splits import StreamedParts

_JPEGS: dict[tuple[int, int, int, int], bytes] = {}


def _red(label: int) -> int:
    return 40 * (label % 6) + 10


def _flat(red: int, height: int, width: int, green: int = 100) -> torch.Tensor:
    image = torch.empty(3, height, width, dtype=torch.uint8)
    image[0], image[1], image[2] = red, green, 50
    return image


def _jpeg(label: int, height: int = 64, width: int = 64) -> bytes:
    """A flat image of ``label``'s colour, encoded once per (colour, size) and reused."""
    key = (_red(label), height, width, 0)
    if key not in _JPEGS:
        _JPEGS[key] = encode_jpeg(_flat(_red(label), height, width), quality=95).numpy().tobytes()
    return _JPEGS[key]


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _wnids(count: int) -> list[str]:
    """WordNet-like ids, listed out of sorted order (as wnids.txt is) so the sort shows."""
    return [f"n{10_000_000 + 7919 * ((index * 37) % count):08d}" for index in range(count)]


def write_tiny_imagenet(root: Path, classes: int = 200) -> Path:
    """tiny-imagenet-200/ as the official zip extracts: 2 train images a class, 1 val image a class."""
    folder = root / layouts.TINY_FOLDER
    wnids = _wnids(classes)
    ordered = sorted(wnids)
    _write(folder / "wnids.txt", "".join(f"{wnid}\n" for wnid in wnids).encode())
    for wnid in wnids:
        label = ordered.index(wnid)
        for number in range(2):
            _write(folder / "train" / wnid / "images" / f"{wnid}_{number}.JPEG", _jpeg(label))
        _write(folder / "train" / wnid / f"{wnid}_boxes.txt", f"{wnid}_0.JPEG\t0\t0\t63\t63\n".encode())
    lines = []
    for number, wnid in enumerate(reversed(wnids)):
        _write(folder / "val" / "images" / f"val_{number}.JPEG", _jpeg(ordered.index(wnid)))
        lines.append(f"val_{number}.JPEG\t{wnid}\t0\t0\t63\t63\n")
    _write(folder / "val" / "val_annotations.txt", "".join(lines).encode())
    _write(folder / "test" / "images" / "test_0.JPEG", _jpeg(0))
    return folder


def write_split_folders(folder: Path, wnids: list[str], per_class: int = 1, height: int = 64, width: int = 64) -> Path:
    ordered = sorted(wnids)
    for part in ("train", "val"):
        for wnid in wnids:
            for number in range(per_class):
                _write(folder / part / wnid / f"{wnid}_{number}.JPEG", _jpeg(ordered.index(wnid), height, width))
    return folder


def _check_colours(images: np.ndarray, labels: np.ndarray) -> None:
    reds = images[:, 0].reshape(len(images), -1).mean(axis=1)
    expected = np.array([_red(label) for label in labels])
    assert np.abs(reds - expected).max() < 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_imagenet(tmp_path_factory.mktemp("tiny"))


def test_tinyimagenet_reads_sorted_classes_and_annotated_val_labels(tiny: Path) -> None:
    layout = layouts.scan("tinyimagenet", str(tiny.parent))
    assert list(layout.classes) == sorted(_wnids(200)) and layout.folder == tiny
    assert layout.train[:2] == ((f"train/{layout.classes[0]}/images/{layout.classes[0]}_0.JPEG", 0),
                                (f"train/{layout.classes[0]}/images/{layout.classes[0]}_1.JPEG", 0))
    annotated = dict(line.split("\t")[:2] for line in (tiny / "val" / "val_annotations.txt").read_text().splitlines())
    assert all(layout.classes[label] == annotated[path.removeprefix("val/images/")] for path, label in layout.test)
    assert layouts.folder_facts("tinyimagenet", str(tiny)) == (200, 400)

    raw = imagefolder.read("tinyimagenet", str(tiny))
    assert raw.train_images.shape == (400, 3, 64, 64) and raw.test_images.shape == (200, 3, 64, 64)
    assert raw.train_images.dtype == np.uint8 and raw.train_labels.dtype == np.int64
    assert raw.train_labels.tolist() == [label for label in range(200) for _ in range(2)]
    assert raw.test_labels.tolist() == [label for _, label in layout.test]
    assert sorted(raw.test_labels.tolist()) == list(range(200)) and raw.test_labels[0] != 0
    _check_colours(raw.train_images, raw.train_labels)
    _check_colours(raw.test_images, raw.test_labels)


def test_imagenette_prefers_160_and_scales_the_shorter_side_then_crops_the_centre(tmp_path: Path) -> None:
    wnids = _wnids(10)
    write_split_folders(tmp_path / "imagenette2", wnids)
    folder = write_split_folders(tmp_path / "imagenette2-160", wnids, height=160, width=240)
    striped = _flat(_red(0), 200, 320)
    striped[:, :, :40] = torch.tensor([0, 255, 0], dtype=torch.uint8)[:, None, None]
    striped[:, :8, :] = torch.tensor([0, 0, 255], dtype=torch.uint8)[:, None, None]
    _write(folder / "train" / sorted(wnids)[0] / "wide.png", encode_png(striped).numpy().tobytes())
    assert layouts.scan("imagenette", str(tmp_path)).folder == folder
    assert layouts.scan("imagenette", str(tmp_path / "imagenette2")).folder == tmp_path / "imagenette2"

    raw = imagefolder.read("imagenette", str(tmp_path))
    assert raw.train_images.shape == (11, 3, 160, 160) and raw.test_images.shape == (10, 3, 160, 160)
    wide = raw.train_images[1].astype(int)
    # 200x320 scaled by 0.8 is 160x256; the centre crop drops 48 columns each side, so the
    # 32-column green stripe goes, while the blue top rows (now 6.4 rows) stay: no squashing.
    assert abs(wide[1, 80:, :].mean() - 100) < 6
    assert wide[2, 0, :].mean() > 200 and wide[2, 10:, :].mean() < 80
    _check_colours(np.delete(raw.train_images, 1, axis=0), np.delete(raw.train_labels, 1))


def test_imagefolder_takes_any_classes_and_image_extensions(tmp_path: Path) -> None:
    names = ["dog", "cat", "bird"]
    write_split_folders(tmp_path, names)
    _write(tmp_path / "train" / "cat" / "upper.JPG", _jpeg(0))
    _write(tmp_path / "train" / "cat" / "nested" / "deep.png", encode_png(_flat(_red(0), 20, 30)).numpy().tobytes())
    _write(tmp_path / "train" / "dog" / "notes.txt", b"not an image")
    layout = layouts.scan("imagefolder", str(tmp_path))
    assert layout.classes == ("bird", "cat", "dog")
    assert [path for path, label in layout.train if label == 1] == [
        "train/cat/cat_0.JPEG", "train/cat/upper.JPG", "train/cat/nested/deep.png"]
    assert layouts.folder_facts("imagefolder", str(tmp_path)) == (3, 5)
    raw = imagefolder.read("imagefolder", str(tmp_path))
    assert raw.train_images.shape == (5, 3, 64, 64) and raw.test_labels.tolist() == [0, 1, 2]


def test_imagenet_decodes_a_small_cut_and_lists_the_full_set_to_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_split_folders(tmp_path, _wnids(1000), height=32, width=32)
    raw = imagefolder.read("imagenet", str(tmp_path))
    assert raw.train_images.shape == (1000, 3, 224, 224) and raw.train_labels.tolist() == list(range(1000))
    monkeypatch.setattr(imagefolder, "IMAGENET_IN_MEMORY", 999)
    listed = imagefolder.read("imagenet", str(tmp_path))
    assert isinstance(listed, StreamedParts) and listed.folder == tmp_path
    assert listed.train_labels.tolist() == raw.train_labels.tolist() and listed.test_labels.tolist() == raw.test_labels.tolist()
    assert listed.train_paths[0] == f"train/{sorted(_wnids(1000))[0]}/{sorted(_wnids(1000))[0]}_0.JPEG"
    before = files.fingerprint("imagenet", str(tmp_path))
    _write(tmp_path / "val" / sorted(_wnids(1000))[3] / "extra.JPEG", _jpeg(3))
    assert files.fingerprint("imagenet", str(tmp_path)) != before


def test_fingerprint_follows_bytes_not_place(tmp_path: Path) -> None:
    folder = write_tiny_imagenet(tmp_path / "a", classes=200)
    first = files.fingerprint("tinyimagenet", str(folder.parent))
    assert files.fingerprint("tinyimagenet", str(folder)) == first
    moved = tmp_path / "b" / "elsewhere"
    moved.parent.mkdir()
    shutil.move(str(folder), str(moved))
    assert files.fingerprint("tinyimagenet", str(moved)) == first
    image = moved / "val" / "images" / "val_7.JPEG"
    image.write_bytes(_jpeg(5))
    assert files.fingerprint("tinyimagenet", str(moved)) != first


@pytest.mark.parametrize(
    "name, build, message",
    [
        ("tinyimagenet", lambda root: write_split_folders(root / "imagenette2", _wnids(10)),
         r"is not the tinyimagenet folder: expected wnids.txt.* found: imagenette2/"),
        ("imagenette", lambda root: write_tiny_imagenet(root, classes=200), r"imagenette not found under .*found: tiny-imagenet-200/"),
        ("imagefolder", lambda root: _write(root / "train" / "a" / "x.png", b""), r"lacks val/ \(found: train/\)"),
    ],
)
def test_wrong_layout_says_what_was_expected_and_found(tmp_path: Path, name: str, build, message: str) -> None:
    build(tmp_path)
    with pytest.raises(DatasetNotFoundError, match=message):
        layouts.scan(name, str(tmp_path))


def _drop_val_class(root: Path) -> None:
    write_split_folders(root / "imagenette2-160", _wnids(10))
    shutil.rmtree(root / "imagenette2-160" / "val" / sorted(_wnids(10))[4])


def _empty_class(root: Path) -> None:
    write_split_folders(root, ["a", "b"])
    for image in (root / "train" / "b").iterdir():
        image.unlink()


def _unknown_wnid(root: Path) -> None:
    folder = write_tiny_imagenet(root)
    annotations = folder / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text().replace(sorted(_wnids(200))[9], "n99999999", 1))


@pytest.mark.parametrize(
    "name, build, message",
    [
        ("imagenette", _drop_val_class, rf"val lacks the class folder {sorted(_wnids(10))[4]}/ that train/ has"),
        ("imagefolder", _empty_class, r"train/b: empty class"),
        ("tinyimagenet", _unknown_wnid, r"val_annotations.txt: line \d+ names wnid n99999999, which wnids.txt does not"),
        ("imagenette", lambda root: write_split_folders(root / "imagenette2-320", _wnids(9)),
         r"train/ has 9 classes, but imagenette has 10"),
        ("tinyimagenet", lambda root: write_tiny_imagenet(root, classes=20), r"wnids.txt has 20 classes, but tinyimagenet has 200"),
        ("imagenet", lambda root: write_split_folders(root, _wnids(10)), r"train/ has 10 classes, but imagenet has 1000"),
    ],
)
def test_bad_folder_is_one_line_naming_the_problem(tmp_path: Path, name: str, build, message: str) -> None:
    build(tmp_path)
    with pytest.raises(DatasetError, match=message) as caught:
        layouts.scan(name, str(tmp_path))
    assert "\n" not in str(caught.value)


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    write_split_folders(tmp_path, ["a", "b"], per_class=3)
    bad = tmp_path / "train" / "b" / "b_1.JPEG"
    bad.write_bytes(_jpeg(1)[:200])
    with pytest.raises(DatasetCorruptError, match=rf"{bad} cannot be decoded as an image") as caught:
        imagefolder.read("imagefolder", str(tmp_path))
    assert "\n" not in str(caught.value)


def test_check_data_reports_counts_and_names_every_unreadable_file(tiny: Path, tmp_path: Path) -> None:
    passed, report = check_data("tinyimagenet", str(tiny))
    assert passed, report
    assert "classes: 200" in report and "train: 400 images, per class min 2, max 2" in report
    assert "test (val/): 200 images, per class min 1, max 1" in report
    assert "decoded: 600 of 600" in report and report.endswith("passed")

    write_split_folders(tmp_path, ["a", "b"], per_class=8)
    broken = [f"train/a/a_{number}.JPEG" for number in range(7)] + [f"val/b/b_{number}.JPEG" for number in range(5)]
    for path in broken:
        (tmp_path / path).write_bytes(b"\xff\xd8 not really a jpeg")
    passed, report = check_data("imagefolder", str(tmp_path))
    assert not passed and report.endswith("FAILED")
    assert "unreadable: 12 files:" in report and "... and 2 more" in report
    assert sum(path in report for path in broken) == 10
    assert len(report.splitlines()) <= 25


def test_check_data_on_a_bad_layout_and_on_bundled_digits(tmp_path: Path) -> None:
    passed, report = check_data("imagenette", str(tmp_path))
    assert not passed and "imagenette not found under" in report
    passed, report = check_data("digits", None)
    assert passed and "train: 1438 images" in report
    passed, report = check_data("mnist", None)
    assert not passed and "allowed:" in report
