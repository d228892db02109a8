"""Tiny ImageNet, Imagenette, ImageNet and any ``train/``+``val/`` image folder, decoded into memory.

``data/layouts.py`` finds the files and labels (torch-free, shared with the fingerprint); this
module decodes them with torchvision (RGB, so grey and CMYK JPEGs come out with three channels),
scales each so it covers the declared size with antialiasing and crops the centre, and returns
uint8 arrays. Decoding runs in a thread pool of ``torch.get_num_threads()`` workers (a stage's CPU
share: ``run_stage`` pins torch to it), since torchvision's decoders release the GIL. ImageNet
itself (1.28M images, 190 GB as uint8 at 224 px) does not fit in memory: above
``IMAGENET_IN_MEMORY`` training images ``read`` lists its files instead, which ``data/streaming.py``
decodes batch by batch; smaller cuts of it (tests, quick runs) read like the rest.

torchvision is imported inside the decoding functions: its C extension costs every process that
imports it 160 MB of resident memory, and only the stages that decode files need it.

Each is ``prepared``: a ``prepare_data`` stage decodes the folder once into a uint8 tensor file that
every stage of every sweep on the same files reads (``stages/prepare_data.py``).

The ``imagefolder`` entry declares ``num_classes`` and ``train_images`` as 0: they are whatever the
folder holds, so the planner reads them with ``data.layouts.folder_facts`` at plan time.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from data.augment import RandomCropFlip
from data.errors import DatasetCorruptError, one_line
from data.layouts import Files, FolderLayout, scan
from data.splits import RawSplits, StreamedParts

DATASETS = {
    "tinyimagenet": {
        "num_classes": 200,
        "image_shape": [3, 64, 64],
        "needs_root": True,
        "prepared": True,
        "train_images": 100000,
        "summary": "Tiny ImageNet: 100,000 train / 10,000 labelled val (our test) 64x64 images, 200 classes "
                   "(tiny-imagenet-200/)",
    },
    "imagenette": {
        "num_classes": 10,
        "image_shape": [3, 160, 160],
        "needs_root": True,
        "prepared": True,
        "train_images": 9469,
        "summary": "Imagenette (fastai imagenette2, -320 or -160): 9,469 train / 3,925 val (our test) images, "
                   "10 ImageNet classes, shorter side scaled to 160 and centre-cropped",
    },
    "imagenet": {
        "num_classes": 1000,
        "image_shape": [3, 224, 224],
        "needs_root": True,
        "prepared": True,
        "train_images": 1281167,
        "summary": "ImageNet ILSVRC-2012: 1,281,167 train / 50,000 val (our test, re-foldered val/<wnid>/) images, "
                   "1000 classes, 224x224 centre crops",
    },
    "imagefolder": {
        "num_classes": 0,
        "image_shape": [3, 64, 64],
        "needs_root": True,
        "prepared": True,
        "train_images": 0,
        "summary": "any root/train/<class>/* and root/val/<class>/* image folder (val is our test), 64x64 centre "
                   "crops; classes and image counts come from the folder",
    },
}

IMAGENET_IN_MEMORY = 20_000
"""The most ImageNet training images ``read`` holds in memory (a cut for quick runs, 3 GB as uint8);
a larger folder streams."""


@dataclass(frozen=True)
class CropFlipBySize:
    """Pad-crop-flip with the padding chosen by the batch's image width: one module, several sizes.

    64 px (Tiny ImageNet, image folders): pad 4, as the usual Tiny ImageNet recipe
    (RandomCrop(64, padding=4) + flip). 160 and 224 px: an eighth of the side, CIFAR's 4/32 ratio
    scaled up; fastai's Imagenette and the ImageNet papers use RandomResizedCrop instead, which an
    in-memory crop of a fixed-size image cannot give. Other widths pad by a sixteenth of the side.
    """

    pads: tuple[tuple[int, int], ...] = ((64, 4), (160, 20), (224, 28))

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        return self.for_width(images.shape[-1])(images, generator)

    def for_width(self, width: int) -> RandomCropFlip:
        """The pad-crop-flip of images ``width`` pixels wide (the data set's, fixed when it loads)."""
        return RandomCropFlip(pad=dict(self.pads).get(width, max(1, width // 16)), flip=True)


AUGMENT = CropFlipBySize()


def decode_file(path: Path) -> Tensor:
    """One image file as uint8 (3, H, W) RGB at its own size; an undecodable file is a one-line error naming it."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    try:
        return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    except (RuntimeError, OSError, ValueError) as error:
        raise DatasetCorruptError(
            f"{path} cannot be decoded as an image ({one_line(error)}); replace or delete it"
        ) from error


def load_image(path: Path, height: int, width: int) -> Tensor:
    """One image file as uint8 (3, height, width): decoded as RGB, scaled with antialiasing so that
    it covers the size (the shorter side fits for a square), then centre-cropped."""
    image = decode_file(path)
    old_height, old_width = image.shape[-2:]
    if (old_height, old_width) != (height, width):
        from torchvision.transforms.v2 import functional as F

        scale = max(height / old_height, width / old_width)
        size = [max(height, round(old_height * scale)), max(width, round(old_width * scale))]
        image = F.center_crop(F.resize(image, size, antialias=True), [height, width])
    return image


def decode_in_parallel(paths: list[Path], use: Callable[[int, Path], None]) -> None:
    """``use(index, path)`` for every path, on ``torch.get_num_threads()`` threads (not the node's core
    count: a 2-CPU Slurm job on a 64-core node must not run 64 decoders); the first error is raised."""
    with ThreadPoolExecutor(max_workers=torch.get_num_threads()) as pool:
        for _ in pool.map(use, range(len(paths)), paths):
            pass


def _decode_split(layout: FolderLayout, files: Files, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.empty((len(files), 3, height, width), dtype=np.uint8)

    def put(index: int, path: Path) -> None:
        images[index] = load_image(path, height, width).numpy()

    decode_in_parallel([layout.folder / path for path, _ in files], put)
    return images, np.fromiter((label for _, label in files), dtype=np.int64, count=len(files))


def read(name: str, root: str | None) -> RawSplits | StreamedParts:
    """The training part and the labelled held-out part (kdbench's test split) of ``name`` under
    ``root``: decoded, or for ImageNet above ``IMAGENET_IN_MEMORY`` training images, its files to stream."""
    layout = scan(name, root)
    if name == "imagenet" and len(layout.train) > IMAGENET_IN_MEMORY:
        return StreamedParts.from_files(layout.folder, layout.train, layout.test)
    _, height, width = DATASETS[name]["image_shape"]
    train_images, train_labels = _decode_split(layout, layout.train, height, width)
    test_images, test_labels = _decode_split(layout, layout.test, height, width)
    return RawSplits(train_images, train_labels, test_images, test_labels)
