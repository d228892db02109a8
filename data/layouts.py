"""The on-disk layouts of the ImageNet family: which image files make each split, and their labels.

Torch-free (stdlib and ``data.errors`` only), because the planner needs the same answers: the
fingerprint in ``data/files.py`` covers exactly the files listed here, and ``folder_facts`` gives
the class and image counts of a generic ``imagefolder`` set, which its ``DATASETS`` literal cannot
know. Classes are numbered in sorted order and files listed as torchvision's ``ImageFolder`` does
(sorted walk, extensions in ``IMAGE_EXTENSIONS`` matched case-insensitively), so a model trained
here and one trained with ``ImageFolder`` agree on what label 7 means.

Each layout's labelled held-out part is kdbench's test split (Tiny ImageNet's official ``test/``
has no labels); ``data/registry.py`` carves the validation split from the training part.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from data.errors import DatasetCorruptError, DatasetError, DatasetNotFoundError, one_line

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""torchvision.datasets.folder.IMG_EXTENSIONS."""

TINY_FOLDER = "tiny-imagenet-200"
IMAGENETTE_FOLDERS = ("imagenette2-160", "imagenette2-320", "imagenette2")
"""In order of preference when several are present: the smallest files decode fastest to 160 px."""

CLASS_COUNTS = {"tinyimagenet": 200, "imagenette": 10, "imagenet": 1000}
LAYOUT_NAMES = ("tinyimagenet", "imagenette", "imagenet", "imagefolder")

Files = tuple[tuple[str, int], ...]
"""(path relative to the data-set folder, in posix form; class index) per image, in reading order."""


@dataclass(frozen=True)
class FolderLayout:
    """One data set's files as found under its folder: the classes (sorted) and each split's images.

    ``extra`` names the label files read besides the images (Tiny ImageNet's wnids and val
    annotations), which the fingerprint covers too.
    """

    name: str
    folder: Path
    classes: tuple[str, ...]
    train: Files
    test: Files
    extra: tuple[str, ...] = ()

    def paths(self) -> list[str]:
        """Every file the reader reads, relative to ``folder``: label files first, then train, then test."""
        return [*self.extra, *(path for path, _ in self.train), *(path for path, _ in self.test)]


def scan(name: str, root: str | None) -> FolderLayout:
    """The layout of data set ``name`` under ``root``; raises a one-line DatasetError when it is not one."""
    if name not in LAYOUT_NAMES:
        raise KeyError(f"no folder layout for data set {name!r}; allowed: {', '.join(LAYOUT_NAMES)}")
    if root is None:
        raise DatasetNotFoundError(
            f"{name} needs a data root: set the sweep key 'data_root' or env KDBENCH_DATA to the folder holding it"
        )
    if not Path(root).is_dir():
        raise DatasetNotFoundError(f"{name}: data root {root} is not a folder")
    if name == "tinyimagenet":
        return _tinyimagenet(Path(root))
    if name == "imagenette":
        return _split_folders(name, _imagenette_folder(Path(root)))
    return _split_folders(name, Path(root))


def folder_facts(name: str, root: str | None) -> tuple[int, int]:
    """(number of classes, training images) of ``name`` under ``root``, for the planner."""
    layout = scan(name, root)
    return len(layout.classes), len(layout.train)


def _listing(folder: Path) -> str:
    """A short account of what ``folder`` holds, for 'found ...' in an error message."""
    try:
        entries = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in os.scandir(folder))
    except OSError as error:
        return f"an unreadable folder ({error.strerror})"
    if not entries:
        return "an empty folder"
    shown = ", ".join(entries[:6])
    return shown + (f" and {len(entries) - 6} more" if len(entries) > 6 else "")


def _subfolders(folder: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


def _images(folder: Path, relative_to: Path) -> list[str]:
    """Image files under ``folder`` (recursively), walked and sorted as torchvision's ImageFolder does."""
    found = []
    for where, _, names in sorted(os.walk(folder, followlinks=True)):
        for file_name in sorted(names):
            if file_name.lower().endswith(IMAGE_EXTENSIONS):
                found.append((Path(where) / file_name).relative_to(relative_to).as_posix())
    return found


def _check_count(name: str, folder: Path, classes: list[str], what: str) -> None:
    expected = CLASS_COUNTS.get(name)
    if expected is not None and len(classes) != expected:
        raise DatasetError(f"{folder}: {what} has {len(classes)} classes, but {name} has {expected}; is this {name}?")


def _split_folders(name: str, folder: Path) -> FolderLayout:
    """``train/<class>/...`` and ``val/<class>/...``, the layout of Imagenette, ImageNet and any ImageFolder."""
    missing = [part for part in ("train", "val") if not (folder / part).is_dir()]
    if missing:
        raise DatasetNotFoundError(
            f"{folder} is not a {name} folder: expected train/<class>/ and val/<class>/ images, but it lacks "
            f"{' and '.join(part + '/' for part in missing)} (found: {_listing(folder)})"
        )
    classes = _subfolders(folder / "train")
    if not classes:
        raise DatasetNotFoundError(
            f"{folder / 'train'} has no class folders (expected train/<class>/*.JPEG; found: {_listing(folder / 'train')})"
        )
    _check_count(name, folder, classes, "train/")
    val_classes = set(_subfolders(folder / "val"))
    absent = [wnid for wnid in classes if wnid not in val_classes]
    if absent:
        raise DatasetError(
            f"{folder / 'val'} lacks the class folder {absent[0]}/ that train/ has"
            + (f" ({len(absent) - 1} more missing)" if len(absent) > 1 else "")
        )
    unknown = sorted(val_classes - set(classes))
    if unknown:
        raise DatasetError(f"{folder / 'val'} has the class folder {unknown[0]}/ that train/ lacks")
    splits = []
    for part in ("train", "val"):
        files: list[tuple[str, int]] = []
        for index, wnid in enumerate(classes):
            images = _images(folder / part / wnid, folder)
            if not images:
                raise DatasetError(
                    f"{folder / part / wnid}: empty class, no image files (allowed extensions: {', '.join(IMAGE_EXTENSIONS)})"
                )
            files.extend((path, index) for path in images)
        splits.append(tuple(files))
    return FolderLayout(name, folder, tuple(classes), splits[0], splits[1])


def _imagenette_folder(root: Path) -> Path:
    """``root`` itself when it is one of fastai's folders, else the preferred one inside it."""
    if root.name in IMAGENETTE_FOLDERS:
        return root
    for candidate in IMAGENETTE_FOLDERS:
        if (root / candidate).is_dir():
            return root / candidate
    raise DatasetNotFoundError(
        f"imagenette not found under {root}: expected one of {', '.join(f + '/' for f in IMAGENETTE_FOLDERS)} "
        f"(fastai's imagenette2 archives, extracted), found: {_listing(root)}"
    )


def _tinyimagenet(root: Path) -> FolderLayout:
    """The official ``tiny-imagenet-200`` folder, with the labelled val/ as the test split."""
    folder = root if (root / "wnids.txt").is_file() or root.name == TINY_FOLDER else root / TINY_FOLDER
    if not (folder / "wnids.txt").is_file():
        raise DatasetNotFoundError(
            f"{folder} is not the tinyimagenet folder: expected wnids.txt, train/<wnid>/images/ and "
            f"val/val_annotations.txt (from tiny-imagenet-200.zip), found: "
            f"{_listing(folder) if folder.is_dir() else _listing(root)}"
        )
    wnids = _read_lines(folder / "wnids.txt")
    classes = sorted(set(wnids))
    _check_count("tinyimagenet", folder, classes, "wnids.txt")
    index_of = {wnid: index for index, wnid in enumerate(classes)}
    train: list[tuple[str, int]] = []
    for wnid in classes:
        images_folder = folder / "train" / wnid / "images"
        if not images_folder.is_dir():
            class_folder = folder / "train" / wnid
            found = _listing(class_folder) if class_folder.is_dir() else "no such folder"
            raise DatasetError(
                f"{images_folder} is missing: the tinyimagenet layout keeps train/<wnid>/images/*.JPEG "
                f"(found in train/{wnid}/: {found})"
            )
        images = _images(images_folder, folder)
        if not images:
            raise DatasetError(f"{images_folder}: empty class, no image files")
        train.extend((path, index_of[wnid]) for path in images)
    return FolderLayout("tinyimagenet", folder, tuple(classes), tuple(train), _tiny_val(folder, index_of),
                        ("wnids.txt", "val/val_annotations.txt"))


def _tiny_val(folder: Path, index_of: dict[str, int]) -> Files:
    """val/images/*.JPEG labelled by val/val_annotations.txt (file, wnid, 4 box numbers; tab-separated), in its order."""
    annotations = folder / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise DatasetNotFoundError(f"{annotations} is missing: tinyimagenet's val labels come from it")
    present = set(_images(folder / "val" / "images", folder / "val" / "images"))
    files: list[tuple[str, int]] = []
    for number, line in enumerate(_read_lines(annotations), start=1):
        fields = line.split("\t")
        if len(fields) < 2:
            raise DatasetError(f"{annotations}: line {number} is not '<file>\\t<wnid>\\t<box>': {line[:60]!r}")
        file_name, wnid = fields[0], fields[1]
        if wnid not in index_of:
            raise DatasetError(f"{annotations}: line {number} names wnid {wnid}, which wnids.txt does not list")
        if file_name not in present:
            raise DatasetError(f"{annotations}: line {number} names {file_name}, which val/images/ lacks")
        present.discard(file_name)
        files.append((f"val/images/{file_name}", index_of[wnid]))
    if present:
        raise DatasetError(f"{folder / 'val' / 'images'}: {sorted(present)[0]} has no line in {annotations.name}")
    empty = sorted(set(index_of.values()) - {label for _, label in files})
    if empty:
        wnid = next(w for w, i in index_of.items() if i == empty[0])
        raise DatasetError(f"{annotations}: empty class, no val image of {wnid}")
    return tuple(files)


def _read_lines(path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path} cannot be read ({one_line(error)})") from error


_SIGNATURES = {  # how each image format's files begin, and what they end with when they are whole
    "jpeg": (b"\xff\xd8\xff", b"\xff\xd9"),
    "png": (b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"),
}
_OTHER_HEADS = (b"BM", b"P5", b"P6", b"II*\x00", b"MM\x00*", b"RIFF")
"""BMP, PGM, PPM, TIFF and WebP: recognised by their first bytes only."""
_TAIL_BYTES = 1024
"""JPEGs may carry padding after their end marker; it is looked for in this many last bytes."""


def damaged_image(path: Path) -> str | None:
    """Why ``path`` is not a whole image file by its bytes alone (None: it looks whole).

    Reads a few bytes at each end, no decoding: a truncated download, an HTML error page saved as
    .JPEG or an empty file shows here in microseconds per file, which lets preflight scan a whole
    folder before anything is queued. A file that passes may still fail to decode; ``data check``
    and the ``prepare_data`` stage decode every image.
    """
    try:
        with open(path, "rb") as file:
            head = file.read(16)
            file.seek(max(0, path.stat().st_size - _TAIL_BYTES))
            tail = file.read()
    except OSError as error:
        return f"cannot be read ({one_line(error)})"
    for image_format, (start, end) in _SIGNATURES.items():
        if head.startswith(start):
            return None if end in tail else f"is a truncated {image_format.upper()} (no end marker)"
    if head.startswith(_OTHER_HEADS):
        return None
    return "is not an image file (no JPEG, PNG, BMP, PPM/PGM, TIFF or WebP signature)" if head else "is empty"


def check_image_files(name: str, root: str) -> None:
    """Raises DatasetCorruptError naming the first damaged image of data set ``name`` under ``root``
    (``damaged_image``) and how many there are."""
    layout = scan(name, root)
    damaged = []
    for relative in (path for path, _ in (*layout.train, *layout.test)):
        problem = damaged_image(layout.folder / relative)
        if problem is not None:
            damaged.append((relative, problem))
    if damaged:
        relative, problem = damaged[0]
        others = f" (and {len(damaged) - 1} more damaged files)" if len(damaged) > 1 else ""
        raise DatasetCorruptError(
            f"{layout.name}: {layout.folder / relative} {problem}{others}; replace or delete it, then list every "
            f"unreadable file with: python runner.py data check {name} --data-root {root}"
        )
