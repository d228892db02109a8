"""Images per second per core of the training batch path, against torchvision's PIL DataLoader.

For each data set shape, kdbench's path (``stages.training.training_batches``: uint8 tensors in
memory, batched crop + flip, per-batch normalisation, one thread) is timed against what the peers
run (RepDistiller, torchvision's examples): a dataset object that hands out one PIL image at a time
through ``RandomCrop(padding)``, ``RandomHorizontalFlip``, ``ToTensor`` and ``Normalize``, in a
DataLoader with worker processes. CIFAR-100's baseline reads the images from memory as torchvision's
CIFAR100 does; Tiny ImageNet's and Imagenette's read the same images as JPEG files through
``datasets.ImageFolder``, as they are shipped. Each result is images/s divided by the cores it
used (1 for kdbench, the workers for the DataLoader); the goal is a ratio >= 5.

Full ImageNet does not fit in memory, so both sides decode JPEGs (336x448, about ImageNet's mean
size) in ``--workers`` DataLoader processes through RandomResizedCrop(224) + flip: kdbench's
streamed path (``data/streaming.py``: torchvision.io decoding, tensor transforms, a seed per
image) against ``ImageFolder`` with PIL transforms; the goal there is a ratio >= 0.9.

Last, the peak resident memory of a real CIFAR-100 student stage (vanilla resnet8x4, one epoch
on a 2,000-image subset of a full-size CIFAR-100 written as the official archive extracts, by the
tests' writer, so the whole data set is read, split and held): goal <= 1.5 GB.

Run: .venv/bin/python bench/data.py [--images 4000] [--workers 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402
from torchvision.io import encode_jpeg  # noqa: E402

from data.cifar import AUGMENT as CIFAR_AUGMENT  # noqa: E402
from data.imagefolder import AUGMENT as FOLDER_AUGMENT  # noqa: E402
from data.registry import DatasetSplits  # noqa: E402
from data.splits import StreamedParts  # noqa: E402
from data.streaming import StreamedSplits  # noqa: E402
from pipeline.plan import build_plan  # noqa: E402
from stages.training import training_batches  # noqa: E402
from tests.test_data import write_cifar100  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BATCH_SIZE = 64
CASES = {  # name: (side, crop padding of the peers' recipe, kdbench's augmentation)
    "cifar100": (32, 4, CIFAR_AUGMENT),
    "tinyimagenet": (64, 4, FOLDER_AUGMENT),
    "imagenette-160": (160, 20, FOLDER_AUGMENT),
}
RSS_GOAL_GB = 1.5


def _images(count: int, side: int, seed: int) -> np.ndarray:
    """Smooth random images (JPEG-compressible like photos, unlike white noise), uint8 (N, 3, side, side)."""
    generator = torch.Generator().manual_seed(seed)
    images = np.empty((count, 3, side, side), dtype=np.uint8)
    for start in range(0, count, 100):  # in chunks: 1,000 float images of 448 px would be 2.4 GB
        coarse = torch.rand((min(100, count - start), 3, max(2, side // 8), max(2, side // 8)), generator=generator)
        smooth = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)
        images[start : start + 100] = (smooth * 255).round().to(torch.uint8).numpy()
    return images


def _splits(images: np.ndarray, classes: int, augment) -> DatasetSplits:
    labels = torch.arange(len(images)) % classes
    empty = torch.empty((0, *images.shape[1:]), dtype=torch.uint8)
    return DatasetSplits(
        train_images=torch.from_numpy(images), train_labels=labels, val_images=empty,
        val_labels=torch.empty(0, dtype=torch.int64), test_images=empty, test_labels=torch.empty(0, dtype=torch.int64),
        num_classes=classes, image_shape=tuple(images.shape[1:]), channel_mean=(120.0, 115.0, 100.0),
        channel_std=(60.0, 60.0, 60.0), augment=augment,
    )


def kdbench_rate(images: np.ndarray, augment) -> float:
    """Images/s of one epoch of training batches on one thread."""
    data = _splits(images, 100, augment)
    settings = SimpleNamespace(batch_size=BATCH_SIZE, augment=True, seed=0)  # what training_batches reads
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        seen = sum(len(labels) for _, labels, _ in training_batches(data, settings, epoch=0))
        return seen / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)


class _InMemoryPIL(Dataset):
    """torchvision's CIFAR100 ``__getitem__``: an HWC uint8 row to a PIL image, then the transforms."""

    def __init__(self, images: np.ndarray, transform) -> None:
        self.images, self.transform = np.ascontiguousarray(images.transpose(0, 2, 3, 1)), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index])), index % 100


def _peer_transform(side: int, padding: int) -> transforms.Compose:
    return transforms.Compose([
        transforms.RandomCrop(side, padding=padding), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize((0.47, 0.45, 0.39), (0.24, 0.24, 0.24)),
    ])


def _write_jpegs(folder: Path, images: np.ndarray) -> Path:
    for index, image in enumerate(images):
        path = folder / f"class_{index % 10:02d}" / f"{index:06d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_jpeg(torch.from_numpy(image), quality=90).numpy().tobytes())
    return folder


def peer_rate(dataset: Dataset, workers: int) -> float:
    """Images/s of one epoch of a shuffled DataLoader with ``workers`` processes (start-up included,
    as every epoch of a peer's loop pays it)."""
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, num_workers=workers, drop_last=False)
    started = time.perf_counter()
    seen = sum(len(labels) for _, labels in loader)
    return seen / (time.perf_counter() - started)


def _peer_imagenet_transform() -> transforms.Compose:
    """torchvision's ImageNet reference training transform, on PIL images."""
    return transforms.Compose([
        transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])


def streamed_rate(folder: Path, workers: int) -> float:
    """Images/s of one epoch of kdbench's streamed ImageNet batches (``data/streaming.py``) over the
    JPEGs in ``folder``'s class folders, decoded by ``workers`` processes."""
    paths = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*.JPEG"))
    labels = [int(path.split("/")[0].removeprefix("class_")) for path in paths]
    files = tuple(zip(paths, labels))
    parts = StreamedParts.from_files(folder, files, ())
    data = StreamedSplits(parts, np.arange(len(paths)), np.arange(0), 10, (3, 224, 224), workers=workers)
    settings = SimpleNamespace(batch_size=BATCH_SIZE, augment=True, seed=0)
    started = time.perf_counter()
    seen = sum(len(labels) for _, labels, _ in training_batches(data, settings, epoch=0))
    return seen / (time.perf_counter() - started)


def student_stage_peak_rss_gb(work: Path) -> float:
    """Peak RSS (GB) of one vanilla resnet8x4 student stage on full-size CIFAR-100, in its own process."""
    data_root = work / "data"
    write_cifar100(data_root, np.random.default_rng(0), train_count=50_000, test_count=10_000)
    sweep = work / "rss.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "rss", "data_root": str(data_root),
        "axes": {"dataset": ["cifar100"], "pair": ["resnet32x4:resnet8x4"], "method": ["vanilla"], "seed": [0]},
        "defaults": {"data": {"val_fraction": 0.1, "subset_size": 2000}, "student": {"epochs": 1}},
        "resources": {"default": {"cpus": os.cpu_count() or 1}},
    }))
    student = next(spec for spec in build_plan(sweep).stages.values() if spec.kind == "train_student")
    # The stage process reports its own peak, VmHWM: getrusage's maxrss would count this process's
    # DataLoader workers, or (Linux keeps it across exec) this process's memory when it forked.
    code = ("import json, sys; from stages import run_stage; run_stage(json.loads(sys.argv[1]), sys.argv[2]); "
            "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')))")
    finished = subprocess.run([sys.executable, "-c", code, json.dumps(student.to_dict()), str(work / "out")], check=True,
                              cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    return int(finished.stdout.split()[-1]) / 1024**2  # kB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000, help="images per data set shape (default 4000)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes of the baseline")
    parser.add_argument("--skip-rss", action="store_true", help="leave out the student stage's peak memory")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, batch {BATCH_SIZE}, {args.images} images, "
          f"baseline DataLoader with {args.workers} workers")
    print(f"{'data set':<16}{'kdbench img/s/core':>20}{'PIL DataLoader img/s/core':>28}{'ratio':>8}")
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        for name, (side, padding, augment) in CASES.items():
            images = _images(args.images, side, seed=side)
            ours = kdbench_rate(images, augment)
            if name == "cifar100":
                peers = _InMemoryPIL(images, _peer_transform(side, padding))
            else:
                peers = datasets.ImageFolder(str(_write_jpegs(work / name, images)), _peer_transform(side, padding))
            theirs = peer_rate(peers, args.workers) / max(args.workers, 1)
            print(f"{name:<16}{ours:>20.0f}{theirs:>28.0f}{ours / theirs:>8.1f}")
        images = _images(args.images, 448, seed=448)[:, :, :336, :]  # 336x448: about ImageNet's mean size
        folder = _write_jpegs(work / "imagenet", images)
        ours = streamed_rate(folder, args.workers) / max(args.workers, 1)
        theirs = peer_rate(datasets.ImageFolder(str(folder), _peer_imagenet_transform()), args.workers) / max(args.workers, 1)
        print(f"{'imagenet-stream':<16}{ours:>20.0f}{theirs:>28.0f}{ours / theirs:>8.2f}  (goal >= 0.9)")
        if not args.skip_rss:
            peak = student_stage_peak_rss_gb(work)
            print(f"peak RSS of a CIFAR-100 student stage: {peak:.2f} GB (goal <= {RSS_GOAL_GB} GB)")


if __name__ == "__main__":
    main()
