"""The data package: digits splits, CIFAR files in their official on-disk format, augmentation.

The CIFAR tests write tiny data sets byte for byte the way the official ones are: Python 2
protocol-2 pickles (every string a BINSTRING, read back as bytes; numpy arrays rebuilt through
``numpy.core.multiarray``) in the official folder names, and the same folders packed as .tar.gz.
"""
from __future__ import annotations

import ast
import dataclasses
import codecs
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import tarfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data import cifar, digits, files, imagefolder
from data.augment import RandomCropFlip
from data.errors import DatasetCorruptError, DatasetError, DatasetNotFoundError
from data.registry import dataset_names, load_dataset
from data.splits import stratified_holdout
from pipeline.catalogue import load_catalogue

_REBUILD_ARRAY = np.empty(0).__reduce__()[0]


class _Python2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle did when the CIFAR files were made."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_binstring(self, obj: str | bytes) -> None:
        raw = obj.encode("latin-1") if isinstance(obj, str) else obj
        size = bytes([len(raw)]) if len(raw) < 256 else struct.pack("<i", len(raw))
        self.write((pickle.SHORT_BINSTRING if len(raw) < 256 else pickle.BINSTRING) + size + raw)
        self.memoize(obj)

    dispatch[str] = dispatch[bytes] = save_binstring

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if obj is _REBUILD_ARRAY:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def _write_pickle(path: Path, content: dict[bytes, Any]) -> None:
    with path.open("wb") as stream:
        _Python2Pickler(stream, protocol=2).dump(content)


def _known_image() -> np.ndarray:
    """Red rises left to right, green top to bottom, blue is flat: any axis mix-up shows."""
    ys, xs = np.mgrid[0:32, 0:32]
    return np.stack([xs * 8, ys * 8, np.full((32, 32), 200)]).astype(np.uint8)


def _official_rows(images: np.ndarray) -> np.ndarray:
    """CIFAR's row: the 1024 red values row-major, then the 1024 green, then the 1024 blue."""
    return np.stack([np.concatenate([image[0].ravel(), image[1].ravel(), image[2].ravel()]) for image in images])


def _batch(images: np.ndarray, labels: list[int], label_key: bytes, title: bytes) -> dict[bytes, Any]:
    return {
        b"batch_label": title,
        label_key: labels,
        b"data": _official_rows(images),
        b"filenames": [b"image_%05d.png" % index for index in range(len(labels))],
    }


def _random_images(rng: np.random.Generator, count: int) -> np.ndarray:
    images = rng.integers(0, 256, size=(count, 3, 32, 32), dtype=np.uint8)
    images[0] = _known_image()
    return images


def _write_cifar10(root: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    train = _random_images(rng, 100)
    train_labels = [index % 10 for index in range(100)]
    for number in range(5):
        part = slice(20 * number, 20 * (number + 1))
        title = b"training batch %d of 5" % (number + 1)
        _write_pickle(folder / f"data_batch_{number + 1}", _batch(train[part], train_labels[part], b"labels", title))
    test = _random_images(rng, 20)
    test_labels = [(3 * index) % 10 for index in range(20)]
    _write_pickle(folder / "test_batch", _batch(test, test_labels, b"labels", b"testing batch 1 of 1"))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _write_pickle(folder / "batches.meta", {b"num_cases_per_batch": 20, b"label_names": names, b"num_vis": 3072})
    (folder / "readme.html").write_text("<html></html>")
    return {"train": train, "train_labels": np.array(train_labels), "test": test, "test_labels": np.array(test_labels)}


def write_cifar100(
    root: Path, rng: np.random.Generator, train_count: int = 100, test_count: int = 20
) -> dict[str, np.ndarray]:
    """CIFAR-100 as its official python archive extracts: ``train_count`` training images, classes in turn."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    train, train_labels = _random_images(rng, train_count), [index % 100 for index in range(train_count)]
    test, test_labels = _random_images(rng, test_count), [(7 * index) % 100 for index in range(test_count)]
    for member, images, labels in (("train", train, train_labels), ("test", test, test_labels)):
        content = _batch(images, labels, b"fine_labels", member.encode())
        content[b"coarse_labels"] = [label // 5 for label in labels]
        _write_pickle(folder / member, content)
    _write_pickle(folder / "meta", {
        b"fine_label_names": [b"fine_%d" % index for index in range(100)],
        b"coarse_label_names": [b"coarse_%d" % index for index in range(20)],
    })
    return {"train": train, "train_labels": np.array(train_labels), "test": test, "test_labels": np.array(test_labels)}


@pytest.fixture(scope="module")
def cifar_roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A root with both data sets extracted, a root with only the official archives, and what was written."""
    folders, archives = tmp_path_factory.mktemp("extracted"), tmp_path_factory.mktemp("archives")
    rng = np.random.default_rng(0)
    written = {"cifar10": _write_cifar10(folders, rng), "cifar100": write_cifar100(folders, rng)}
    for folder in ("cifar-10-batches-py", "cifar-100-python"):
        archive = "cifar-10-python.tar.gz" if folder.startswith("cifar-10-") else "cifar-100-python.tar.gz"
        with tarfile.open(archives / archive, "w:gz") as tar:
            tar.add(folders / folder, arcname=folder)
    return {"folder": folders, "archive": archives, "written": written}


def _declared(module: ModuleType) -> dict[str, Any]:
    source = Path(module.__file__).read_text()
    assignments = [
        node for node in ast.parse(source).body
        if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == "DATASETS" for target in node.targets)
    ]
    assert len(assignments) == 1
    return ast.literal_eval(assignments[0].value)


# --- digits -----------------------------------------------------------------------------------------


def test_digits_split_sizes_and_types() -> None:
    data = load_dataset("digits", None, 0.1, 0)
    assert (len(data.train_labels), len(data.val_labels), len(data.test_labels)) == (1294, 144, 359)
    assert data.train_images.shape == (1294, 1, 8, 8) and data.image_shape == (1, 8, 8)
    assert data.num_classes == 10
    for images, labels in ((data.train_images, data.train_labels), (data.val_images, data.val_labels),
                           (data.test_images, data.test_labels)):
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64 and len(images) == len(labels)


def test_digits_splits_are_disjoint_and_cover_every_image() -> None:
    from sklearn.datasets import load_digits

    raw = load_digits()
    index_of = {image.astype(np.float32).tobytes(): index for index, image in enumerate(raw.images)}
    assert len(index_of) == len(raw.images)
    data = load_dataset("digits", None, 0.2, 5)
    found = [
        {index_of[image[0].tobytes()] for image in images.numpy().astype(np.float32)}
        for images in (data.train_images, data.val_images, data.test_images)
    ]
    train, val, test = found
    assert not train & val and not train & test and not val & test
    assert train | val | test == set(range(len(raw.images)))
    assert sum(map(len, found)) == len(raw.images)


def test_digits_splits_are_stratified() -> None:
    data = load_dataset("digits", None, 0.25, 1)
    test_counts, val_counts = torch.bincount(data.test_labels), torch.bincount(data.val_labels)
    rest_counts = val_counts + torch.bincount(data.train_labels)
    assert (abs(test_counts - 0.2 * (test_counts + rest_counts)) < 1).all()
    assert (abs(val_counts - 0.25 * rest_counts) < 1).all()


def test_split_seed_repeats_exactly_and_moves_only_the_validation_split() -> None:
    first, again, other = (load_dataset("digits", None, 0.1, seed) for seed in (7, 7, 8))
    for name in ("train_images", "train_labels", "val_images", "val_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    assert not torch.equal(first.val_images, other.val_images)
    assert np.array_equal(first.test_images.numpy(), other.test_images.numpy())
    assert torch.equal(first.test_labels, other.test_labels)


def test_training_split_is_normalised_per_channel() -> None:
    data = load_dataset("digits", None, 0.1, 0)
    normalised = data.normalise(data.train_images)
    assert normalised.dtype == torch.float32
    assert abs(normalised.mean().item()) < 1e-4
    assert abs(normalised.std(correction=0).item() - 1) < 1e-4


def test_val_fraction_zero_gives_empty_validation_tensors() -> None:
    data = load_dataset("digits", None, 0.0, 0)
    assert data.val_images.shape == (0, 1, 8, 8) and data.val_labels.shape == (0,)
    assert len(data.train_labels) == 1797 - 359


def test_stratified_holdout_is_a_partition_with_each_class_rounded() -> None:
    labels = np.repeat(np.arange(5), [3, 10, 17, 40, 1])
    kept, held = stratified_holdout(labels, 0.3, 11)
    assert np.array_equal(np.sort(np.concatenate([kept, held])), np.arange(len(labels)))
    assert len(held) == round(0.3 * len(labels))
    held_counts = np.bincount(labels[held], minlength=5)
    exact = 0.3 * np.bincount(labels)
    assert ((np.floor(exact) <= held_counts) & (held_counts <= np.ceil(exact))).all()
    assert not np.array_equal(held, stratified_holdout(labels, 0.3, 12)[1])


def test_unknown_name_and_bad_fraction_are_refused() -> None:
    with pytest.raises(KeyError, match="cifar10.*cifar100.*digits") as raised:
        load_dataset("mnist", None, 0.1, 0)
    assert "mnist" in str(raised.value)
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset("digits", None, 1.0, 0)


# --- CIFAR ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["folder", "archive"])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reads_the_official_format(cifar_roots: dict[str, Any], name: str, form: str) -> None:
    written = cifar_roots["written"][name]
    data = load_dataset(name, str(cifar_roots[form]), 0.0, 0)
    assert data.image_shape == (3, 32, 32) and data.num_classes == (10 if name == "cifar10" else 100)
    assert np.array_equal(data.train_images.numpy(), written["train"])
    assert np.array_equal(data.test_images.numpy(), written["test"])
    assert np.array_equal(data.train_labels.numpy(), written["train_labels"])
    assert np.array_equal(data.test_labels.numpy(), written["test_labels"])
    red, green, blue = data.test_images[:1].numpy()[0]
    assert red[5, 3] == 3 * 8 and green[5, 3] == 5 * 8 and blue[5, 3] == 200
    normalised = data.normalise(data.train_images)
    assert normalised.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (normalised.std(dim=(0, 2, 3), correction=0) - 1).abs().max() < 1e-4


def test_cifar_validation_split_comes_from_the_training_files(cifar_roots: dict[str, Any]) -> None:
    data = load_dataset("cifar10", str(cifar_roots["archive"]), 0.2, 3)
    assert (len(data.train_labels), len(data.val_labels), len(data.test_labels)) == (80, 20, 20)
    assert torch.bincount(data.val_labels).tolist() == [2] * 10
    train_rows = {row.tobytes() for row in cifar_roots["written"]["cifar10"]["train"]}
    assert all(image.tobytes() in train_rows for image in data.val_images.numpy().astype(np.uint8))


def test_data_root_falls_back_to_the_environment(cifar_roots: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDBENCH_DATA", str(cifar_roots["archive"]))
    assert len(load_dataset("cifar100", None, 0.0, 0).test_labels) == 20


def test_missing_data_names_the_paths_and_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DatasetNotFoundError) as raised:
        load_dataset("cifar10", str(tmp_path), 0.1, 0)
    message = str(raised.value)
    assert str(tmp_path / "cifar-10-batches-py") in message and str(tmp_path / "cifar-10-python.tar.gz") in message
    assert "KDBENCH_DATA" in message and "data_root" in message and cifar.OFFICIAL_PAGE in message
    assert "\n" not in message
    monkeypatch.delenv("KDBENCH_DATA", raising=False)
    with pytest.raises(DatasetNotFoundError, match="KDBENCH_DATA.*cifar-100-python.tar.gz") as raised:
        load_dataset("cifar100", None, 0.1, 0)
    assert "\n" not in str(raised.value)


def _read(name: str, root: Path) -> Any:
    return load_dataset(name, str(root), 0.1, 0)


def _fingerprint(name: str, root: Path) -> str:
    return files.fingerprint(name, str(root))


_READ_AND_FINGERPRINT = pytest.mark.parametrize("use", [_read, _fingerprint], ids=["read", "fingerprint"])
"""The reader and the planner's fingerprint find the files with the same code, so fail alike."""


@_READ_AND_FINGERPRINT
def test_missing_member_of_an_extracted_folder_is_named(
    cifar_roots: dict[str, Any], tmp_path: Path, use: Callable[[str, Path], Any]
) -> None:
    shutil.copytree(cifar_roots["folder"] / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_4"):
        use("cifar10", tmp_path)


@_READ_AND_FINGERPRINT
def test_missing_data_set_names_both_forms(tmp_path: Path, use: Callable[[str, Path], Any]) -> None:
    with pytest.raises(DatasetNotFoundError) as raised:
        use("cifar100", tmp_path)
    assert str(tmp_path / "cifar-100-python") in str(raised.value) and "cifar-100-python.tar.gz" in str(raised.value)


def test_truncated_batch_file_is_named_in_one_line(cifar_roots: dict[str, Any], tmp_path: Path) -> None:
    shutil.copytree(cifar_roots["folder"] / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py")
    damaged = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    damaged.write_bytes(damaged.read_bytes()[:5000])
    with pytest.raises(DatasetCorruptError) as raised:
        load_dataset("cifar10", str(tmp_path), 0.1, 0)
    assert f"{damaged} is truncated" in str(raised.value) and "\n" not in str(raised.value)


@_READ_AND_FINGERPRINT
def test_truncated_archive_is_named_in_one_line(
    cifar_roots: dict[str, Any], tmp_path: Path, use: Callable[[str, Path], Any]
) -> None:
    archive = tmp_path / "cifar-100-python.tar.gz"
    archive.write_bytes((cifar_roots["archive"] / archive.name).read_bytes()[:3000])
    with pytest.raises(DatasetCorruptError) as raised:
        use("cifar100", tmp_path)
    assert str(archive) in str(raised.value) and "truncated" in str(raised.value) and "\n" not in str(raised.value)


class _MakesAFolderWhenUnpickled:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return os.mkdir, (str(self.path),)


def test_a_pickle_that_would_run_code_is_refused_naming_the_global(cifar_roots: dict[str, Any], tmp_path: Path) -> None:
    shutil.copytree(cifar_roots["folder"] / "cifar-100-python", tmp_path / "cifar-100-python")
    marker = tmp_path / "code-ran"
    meta = tmp_path / "cifar-100-python" / "meta"
    with meta.open("wb") as stream:
        pickle.dump({b"fine_label_names": _MakesAFolderWhenUnpickled(marker)}, stream, protocol=2)
    with pytest.raises(DatasetCorruptError) as raised:
        load_dataset("cifar100", str(tmp_path), 0.1, 0)
    message = str(raised.value)
    assert message.startswith(f"{meta}: refused to unpickle {os.mkdir.__module__}.mkdir: ")
    assert "accepts only plain data" in message and "cannot run code" in message and "download" in message
    assert "truncated" not in message and "\n" not in message
    assert not marker.exists()


def _unpickled_members(folder: Path) -> dict[str, dict[bytes, Any]]:
    return {member: cifar._unpickle(str(folder / member), io.BytesIO((folder / member).read_bytes())).content
            for member in ("train", "test", "meta")}


def test_a_file_resaved_by_python_3_with_protocol_2_loads_to_the_same_arrays(
    cifar_roots: dict[str, Any], tmp_path: Path
) -> None:
    """Python 3's protocol 2 writes each bytes object as _codecs.encode(str, 'latin1') and b'' as bytes()."""
    resaved = tmp_path / "cifar-100-python"
    resaved.mkdir()
    for member, content in _unpickled_members(cifar_roots["folder"] / "cifar-100-python").items():
        if member == "meta":
            content[b"empty"] = b""
        (resaved / member).write_bytes(pickle.dumps(content, protocol=2))
    assert b"_codecs\nencode" in (resaved / "train").read_bytes()
    assert b"__builtin__\nbytes" in (resaved / "meta").read_bytes()
    official = load_dataset("cifar100", str(cifar_roots["folder"]), 0.1, 0)
    again = load_dataset("cifar100", str(tmp_path), 0.1, 0)
    for name in ("train_images", "train_labels", "val_images", "val_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(official, name), getattr(again, name)), name


class _EncodesWith:
    def __init__(self, codec: str):
        self.codec = codec

    def __reduce__(self) -> tuple[Any, ...]:
        return codecs.encode, ("text", self.codec)


@pytest.mark.parametrize(("value", "refused"), [
    (_EncodesWith("rot13"), "_codecs.encode with codec 'rot13'"),
    (_MakesAFolderWhenUnpickled(Path("/nonexistent/never-made")), f"{os.mkdir.__module__}.mkdir"),
])
def test_only_the_latin1_form_of_codecs_encode_is_allowed(
    cifar_roots: dict[str, Any], tmp_path: Path, value: Any, refused: str
) -> None:
    shutil.copytree(cifar_roots["folder"] / "cifar-100-python", tmp_path / "cifar-100-python")
    test = tmp_path / "cifar-100-python" / "test"
    content = _unpickled_members(tmp_path / "cifar-100-python")["test"]
    test.write_bytes(pickle.dumps({**content, b"batch_label": value}, protocol=2))
    with pytest.raises(DatasetCorruptError, match=f"^{test}: refused to unpickle {refused}"):
        load_dataset("cifar100", str(tmp_path), 0.1, 0)


# --- fingerprints -----------------------------------------------------------------------------------


def write_cifar100_root(root: Path, seed: int) -> Path:
    """A data root holding a small CIFAR-100 in the official format, its content drawn from ``seed``."""
    root.mkdir(parents=True, exist_ok=True)
    write_cifar100(root, np.random.default_rng(seed))
    return root


def settled(folder: Path) -> Path:
    """Dates every file under ``folder`` a day back: the cache ignores files modified seconds ago."""
    day_ago = time.time_ns() - 86_400 * 10**9
    for path in folder.rglob("*"):
        os.utime(path, ns=(day_ago, day_ago))
    return folder


class _CountedHashing:
    """Counts the files the fingerprint reads in full, to tell a cache hit from a recomputation."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.count = 0
        hash_one = files._size_and_sha256

        def counted(where: str, stream: Any) -> tuple[int, str]:
            self.count += 1
            return hash_one(where, stream)

        monkeypatch.setattr(files, "_size_and_sha256", counted)


@pytest.fixture
def user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "kdbench" / "fingerprints.json"


def test_fingerprint_follows_the_content_not_the_folder_or_the_form(cifar_roots: dict[str, Any], tmp_path: Path) -> None:
    extracted = files.fingerprint("cifar100", str(cifar_roots["folder"]))
    assert len(extracted) == 64
    moved = tmp_path / "moved"
    shutil.copytree(cifar_roots["folder"] / "cifar-100-python", moved / "cifar-100-python", copy_function=shutil.copy)
    assert files.fingerprint("cifar100", str(moved)) == extracted, "the same files in another folder"
    assert not (moved / files.CACHE_NAME).exists(), "files modified a moment ago are not cached"
    assert files.fingerprint("cifar100", str(cifar_roots["archive"])) == extracted, "the same members in the .tar.gz"
    assert files.fingerprint("cifar100", str(write_cifar100_root(tmp_path / "other", seed=1))) != extracted
    (moved / "cifar-100-python" / "readme.txt").write_text("not read by the reader")
    assert files.fingerprint("cifar100", str(moved)) == extracted
    labels = moved / "cifar-100-python" / "test"
    labels.write_bytes(labels.read_bytes()[:-1] + b"\0")
    assert files.fingerprint("cifar100", str(moved)) != extracted, "one byte of one member"


def test_fingerprint_cache_is_written_beside_the_data_and_reused_until_a_file_changes(
    cifar_roots: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user_cache: Path
) -> None:
    settled(shutil.copytree(cifar_roots["folder"] / "cifar-100-python", tmp_path / "cifar-100-python"))
    hashing = _CountedHashing(monkeypatch)
    first = files.fingerprint("cifar100", str(tmp_path))
    assert hashing.count == 3
    cache = json.loads((tmp_path / files.CACHE_NAME).read_text())
    entry = cache["entries"]["cifar-100-python"]
    assert entry["fingerprint"] == first
    assert [name for name, _, _ in entry["stats"]] == ["cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"]
    assert files.fingerprint("cifar100", str(tmp_path)) == first and hashing.count == 3, "read from the cache"
    test = tmp_path / "cifar-100-python" / "test"
    status = test.stat()
    os.utime(test, ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000_000))
    assert files.fingerprint("cifar100", str(tmp_path)) == first and hashing.count == 6, "a new mtime is hashed again"
    assert files.fingerprint("cifar100", str(tmp_path)) == first and hashing.count == 6
    assert not user_cache.exists()


def test_a_read_only_data_folder_falls_back_to_the_user_cache_then_to_none(
    cifar_roots: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user_cache: Path
) -> None:
    shared = tmp_path / "shared"
    settled(shutil.copytree(cifar_roots["archive"], shared, ignore=shutil.ignore_patterns(files.CACHE_NAME)))
    expected = files.fingerprint("cifar100", str(cifar_roots["archive"]))
    write = files.write_atomic

    def refused_in_shared(path: Path, data: bytes) -> None:  # chmod alone does not stop root, who runs CI
        if shared in path.parents:
            raise PermissionError(13, "Permission denied", str(path))
        write(path, data)

    monkeypatch.setattr(files, "write_atomic", refused_in_shared)
    hashing = _CountedHashing(monkeypatch)
    shared.chmod(0o555)
    try:
        assert files.fingerprint("cifar100", str(shared)) == expected
        assert not (shared / files.CACHE_NAME).exists()
        entries = json.loads(user_cache.read_text())["entries"]
        assert entries[str(shared.resolve() / "cifar-100-python.tar.gz")]["fingerprint"] == expected
        assert files.fingerprint("cifar100", str(shared)) == expected and hashing.count == 3, "read from the user cache"
        user_cache.unlink()
        blocked = tmp_path / "a-file"
        blocked.write_text("")
        monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))  # a user cache under a file cannot be made, even by root
        assert files.fingerprint("cifar100", str(shared)) == expected and hashing.count == 6
        assert load_dataset("cifar100", str(shared), 0.0, 0, expected).num_classes == 100
    finally:
        shared.chmod(0o755)


def test_a_damaged_cache_is_ignored(cifar_roots: dict[str, Any], tmp_path: Path) -> None:
    settled(shutil.copytree(cifar_roots["folder"] / "cifar-100-python", tmp_path / "cifar-100-python"))
    (tmp_path / files.CACHE_NAME).write_text('{"format": 1, "entries": {"cifar-100-python": ')
    expected = files.fingerprint("cifar100", str(cifar_roots["folder"]))
    assert files.fingerprint("cifar100", str(tmp_path)) == expected
    assert json.loads((tmp_path / files.CACHE_NAME).read_text())["entries"]["cifar-100-python"]["fingerprint"] == expected


def test_digits_fingerprint_is_the_sklearn_file_the_reader_reads() -> None:
    import sklearn

    path = Path(sklearn.__file__).parent / "datasets" / "data" / "digits.csv.gz"
    assert files.digits_file() == path
    content = path.read_bytes()
    line = f"digits.csv.gz {len(content)} {hashlib.sha256(content).hexdigest()}\n"
    expected = hashlib.sha256(line.encode()).hexdigest()
    assert files.fingerprint("digits", None) == files.fingerprint("digits", "/any/root") == expected


def test_a_stage_refuses_other_data_than_its_plan_hashed(cifar_roots: dict[str, Any]) -> None:
    root = str(cifar_roots["folder"])
    planned = files.fingerprint("cifar100", root)
    assert len(load_dataset("cifar100", root, 0.0, 0, planned).test_labels) == 20
    with pytest.raises(DatasetError, match=f"fingerprint {planned[:12]}.*plan hashed 000000000000.*plan the sweep again"):
        load_dataset("cifar100", root, 0.0, 0, "0" * 64)
    with pytest.raises(DatasetError, match="planned without a data_root.*data_root"):
        load_dataset("cifar100", root, 0.0, 0, files.NO_DATA_ROOT)


# --- augmentation -----------------------------------------------------------------------------------


def _distinct_images(count: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """Every pixel a different positive value, so each crop offset and each flip gives a different image."""
    return torch.arange(1, 1 + np.prod(shape), dtype=torch.float32).reshape(shape).expand(count, *shape).clone()


def _crops(image: torch.Tensor, pad: int, mirrored: bool) -> dict[tuple[int, int], torch.Tensor]:
    padded = F.pad(image, (pad, pad, pad, pad))
    height, width = image.shape[1:]
    crops = {(top, left): padded[:, top:top + height, left:left + width]
             for top in range(2 * pad + 1) for left in range(2 * pad + 1)}
    return {offset: crop.flip(-1) if mirrored else crop for offset, crop in crops.items()}


def _offsets_matching(output: torch.Tensor, crops: dict[tuple[int, int], torch.Tensor]) -> list[tuple[int, int]]:
    return [offset for offset, crop in crops.items() if torch.equal(output, crop)]


def test_augment_keeps_shape_and_repeats_with_the_same_generator() -> None:
    images = torch.randn(16, 3, 32, 32)
    augment = RandomCropFlip(pad=4, flip=True)
    first = augment(images, torch.Generator().manual_seed(1))
    assert first.shape == images.shape and first.dtype == images.dtype
    assert torch.equal(first, augment(images, torch.Generator().manual_seed(1)))
    assert not torch.equal(first, augment(images, torch.Generator().manual_seed(2)))


def test_augment_pads_uint8_images_with_black_before_normalisation() -> None:
    """As torchvision's RandomCrop(32, padding=4) on the PIL image in RepDistiller's CIFAR pipeline:
    the pixels a shifted crop brings in are 0, not the mean colour."""
    images = torch.full((64, 3, 8, 8), 200, dtype=torch.uint8)
    outputs = RandomCropFlip(pad=2, flip=True)(images, torch.Generator().manual_seed(0))
    assert outputs.dtype == torch.uint8
    assert set(outputs.unique().tolist()) == {0, 200}
    shifted = (outputs == 0).flatten(1).any(dim=1)
    assert 40 <= int(shifted.sum()) < 64  # 24 of the 25 offsets bring in padding


def test_crop_offsets_vary_per_image_and_stay_within_the_padding() -> None:
    images = _distinct_images(64, (3, 32, 32))
    outputs = RandomCropFlip(pad=4, flip=False)(images, torch.Generator().manual_seed(0))
    crops = _crops(images[0], 4, mirrored=False)
    offsets = [_offsets_matching(output, crops) for output in outputs]
    assert all(len(matches) == 1 for matches in offsets)
    assert len({matches[0] for matches in offsets}) > 20


def test_flip_mirrors_about_half_the_images() -> None:
    images = _distinct_images(64, (3, 32, 32))
    outputs = RandomCropFlip(pad=0, flip=True)(images, torch.Generator().manual_seed(0))
    mirrored = [torch.equal(output, images[0].flip(-1)) for output in outputs]
    assert all(flipped or torch.equal(output, images[0]) for flipped, output in zip(mirrored, outputs))
    assert 16 <= sum(mirrored) <= 48


def test_each_data_set_gets_its_augmentation_and_digits_are_never_mirrored(cifar_roots: dict[str, Any]) -> None:
    assert load_dataset("cifar10", str(cifar_roots["folder"]), 0.0, 0).augment == RandomCropFlip(pad=4, flip=True)
    data = load_dataset("digits", None, 0.1, 0)
    assert data.augment == RandomCropFlip(pad=1, flip=False)
    images = _distinct_images(200, (1, 8, 8))
    outputs = data.augment(images, torch.Generator().manual_seed(0))
    upright = _crops(images[0], 1, mirrored=False)
    assert all(len(_offsets_matching(output, upright)) == 1 for output in outputs)
    assert len({_offsets_matching(output, upright)[0] for output in outputs}) == 9


# --- declarations -----------------------------------------------------------------------------------


def test_datasets_literals_are_readable_without_importing_and_match_the_registry() -> None:
    declared = {name: entry for module in (digits, cifar, imagefolder) for name, entry in _declared(module).items()}
    assert sorted(declared) == dataset_names() == sorted(files.FINGERPRINTS)
    for module in (digits, cifar, imagefolder):
        assert _declared(module) == module.DATASETS
    for entry in declared.values():
        assert set(entry) - {"prepared"} == {"num_classes", "image_shape", "needs_root", "summary", "train_images"}
    digits_spec = load_catalogue().datasets["digits"]
    for val_fraction in (0.0, 0.1, 0.25):  # what the planner's preflight counts is what the stage trains on
        assert digits_spec.training_split_size(val_fraction) == len(load_dataset("digits", None, val_fraction, 0).train_labels)
    loaded = load_dataset("digits", None, 0.1, 0)
    assert loaded.num_classes == declared["digits"]["num_classes"]
    assert list(loaded.image_shape) == declared["digits"]["image_shape"]


def test_data_package_init_is_empty() -> None:
    assert Path(digits.__file__).with_name("__init__.py").read_text().strip() == ""


def test_training_batches_are_the_normalised_images_of_their_indices() -> None:
    """What a model trains on is float32, normalised with the training split's statistics (mean ~0,
    std ~1 per channel over an epoch), not the uint8 pixels the data set holds."""
    from types import SimpleNamespace

    from stages.training import training_batches

    data = load_dataset("digits", None, 0.1, 0)
    settings = SimpleNamespace(batch_size=256, augment=False, seed=0)  # what training_batches reads
    batches = list(training_batches(data, settings, epoch=0))
    for images, _, indices in batches:
        assert images.dtype == torch.float32
        assert torch.equal(images, data.normalise(data.train_images[indices]))
    epoch = torch.cat([images for images, _, _ in batches])
    assert abs(epoch.mean().item()) < 1e-4 and abs(epoch.std(correction=0).item() - 1) < 1e-4


def test_an_epochs_augmentation_is_drawn_up_front_as_batch_by_batch_drawing_draws_it() -> None:
    """A resident data set draws the epoch's crops and flips before its first batch; the images must
    be the ones augmenting each batch in turn from the same generator gives (the numbers pinned
    before that change), or resumed and cached runs would see other images than their originals."""
    images = _distinct_images(70, (3, 32, 32))
    augment = RandomCropFlip(pad=4, flip=True)
    generator = torch.Generator().manual_seed(7)
    batch_by_batch = [augment(images[start : start + 32], generator) for start in (0, 32, 64)]
    splits = load_dataset("digits", None, 0.0, 0)
    splits = dataclasses.replace(splits, train_images=images, train_labels=torch.zeros(70, dtype=torch.int64), augment=augment)
    up_front = list(splits.epoch_images(torch.arange(70), 32, torch.Generator().manual_seed(7)))
    assert [len(batch) for batch in up_front] == [32, 32, 6]
    assert all(torch.equal(first, second) for first, second in zip(batch_by_batch, up_front))
    # what batch-by-batch augmentation gave before the draws were split from the pixel work
    assert hashlib.sha256(torch.cat(up_front).numpy().tobytes()).hexdigest()[:16] == "68f8c5c2fef538c0"
    draws = augment.draw_epoch([32, 32, 6], torch.Generator().manual_seed(7))
    assert draws.shape == (70, 3) and set(draws[:, 2].tolist()) == {0, 1} and 0 <= draws[:, :2].min() <= draws[:, :2].max() <= 8


def test_image_folders_get_the_padding_of_their_width() -> None:
    assert imagefolder.AUGMENT.for_width(64) == RandomCropFlip(pad=4, flip=True)
    assert imagefolder.AUGMENT.for_width(160) == RandomCropFlip(pad=20, flip=True)
    assert imagefolder.AUGMENT.for_width(96) == RandomCropFlip(pad=6, flip=True)
    assert RandomCropFlip(pad=1, flip=False).for_width(8) == RandomCropFlip(pad=1, flip=False)


def test_a_data_set_is_resident_on_a_gpu_only_where_it_fits(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """On a GPU the images move there when they take at most a quarter of its free memory; else
    they stay on the host with a note. On a CPU nothing moves."""
    from stages import loading

    data = load_dataset("digits", None, 0.1, 0)
    assert loading.resident_data(data, torch.device("cpu")) is data
    moved_to = []
    monkeypatch.setattr(type(data), "resident_on", lambda self, device: moved_to.append(device) or self)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (4 * data.image_bytes, 8 * data.image_bytes))
    assert loading.resident_data(data, torch.device("cuda", 1)) is data and moved_to == [torch.device("cuda", 1)]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (4 * data.image_bytes - 4, 8 * data.image_bytes))
    assert loading.resident_data(data, torch.device("cuda", 0)) is data and len(moved_to) == 1
    assert "stay in host memory" in capsys.readouterr().err
