"""Which files each data set's reader reads, and a fingerprint of their content for stage hashes.

``data_root`` says where the data is, so it stays out of stage hashes; what the files hold must go
in, or a teacher trained on a 128-image cut and one trained on the real files share a folder. The
readers (``data/cifar.py``, ``data/digits.py``) find their files with the functions here, and the
planner fingerprints with the very same functions, so the hash covers exactly the bytes a stage
reads. That is why this is the one home of both: it sits beside the readers, and it imports only
the standard library (and ``data.errors``) so that the torch-free planner may import it too.

A fingerprint is the sha256 of one ``<member> <size> <sha256>`` line per file the reader reads,
in the reader's order. CIFAR's members are hashed by content whether they lie in the extracted
folder or inside the .tar.gz, so extracting the archive, or moving the files, keeps every hash;
headers alone would not tell apart two cuts of equal size, or two label files. Hashing CIFAR-100
(186 MB) takes 0.2 s extracted and 0.6 s from the .tar.gz on a local disk (more over a network
filesystem), against a fraction of a millisecond per plan from the cache beside the data in
``.kdbench-fingerprints.json``, keyed by each file's (name, size, mtime_ns); where that folder is
read-only (shared data sets) the cache is ``$XDG_CACHE_HOME/kdbench/fingerprints.json`` (default
``~/.cache``), and where neither can be written the fingerprint is computed each time. The digits
file (57 kB) is hashed each time: that takes less than reading a cache.

The ImageNet-family folders (``data/layouts.py`` lists their files) are fingerprinted the same way,
one line per image and label file, paths relative to the data-set folder (so moving the folder, or
pointing the root at it or at its parent, keeps the hash), cached in the data-set folder itself.
ImageNet is the exception: hashing its 1.28M files (140 GB) would take many minutes for each new
cache entry and its cache would be an 80 MB JSON file, so ``imagenet`` hashes each file's
(relative path, size) only, without the cache (stat-ing the files is what a cache check costs
anyway). An edit that keeps a file's size goes unseen there; the official files never change.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, TypeVar

from data.errors import DatasetCorruptError, DatasetNotFoundError, one_line
from data.layouts import scan

OFFICIAL_PAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"
CACHE_NAME = ".kdbench-fingerprints.json"
CACHE_FORMAT = 1
NO_DATA_ROOT = "unknown: no data_root set"
"""The fingerprint a plan records for a data set that reads files when no data_root is set; submit
refuses such a plan, and a stage that reads other data than its plan recorded refuses to run."""

_CHUNK = 1 << 20
_SETTLE_NS = 2_000_000_000
T = TypeVar("T")


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps its files, as the official archive lays them out."""

    title: str
    folder: str
    archive: str
    train_members: tuple[str, ...]
    test_member: str
    meta_member: str

    @property
    def members(self) -> tuple[str, ...]:
        return (*self.train_members, self.test_member, self.meta_member)


CIFAR_LAYOUTS = {
    "cifar10": CifarLayout(
        "CIFAR-10", "cifar-10-batches-py", "cifar-10-python.tar.gz",
        tuple(f"data_batch_{number}" for number in range(1, 6)), "test_batch", "batches.meta",
    ),
    "cifar100": CifarLayout("CIFAR-100", "cifar-100-python", "cifar-100-python.tar.gz", ("train",), "test", "meta"),
}


@dataclass(frozen=True)
class CifarFolder:
    """The extracted folder; each member is its own file."""

    path: Path
    layout: CifarLayout

    def files(self) -> list[Path]:
        """The member files, refusing a folder that lacks one (its stats key the cache)."""
        paths = [self.path / member for member in self.layout.members]
        for path in paths:
            if not path.is_file():
                raise DatasetNotFoundError(
                    f"{self.layout.title} is incomplete: {path} is missing; download {self.layout.archive} from "
                    f"{OFFICIAL_PAGE} and extract it into {self.path.parent}"
                )
        return paths

    def read_each(self, use: Callable[[str, IO[bytes]], T]) -> dict[str, T]:
        """``use(where, stream)`` of every member, by member name."""
        results: dict[str, T] = {}
        for path in self.files():
            try:
                with path.open("rb") as stream:
                    results[path.name] = use(str(path), stream)
            except OSError as error:
                raise DatasetCorruptError(f"{path} cannot be read ({one_line(error)}); check it and its permissions") from error
        return results


@dataclass(frozen=True)
class CifarArchive:
    """The untouched official .tar.gz; members are read straight out of it, in one pass."""

    path: Path
    layout: CifarLayout

    def files(self) -> list[Path]:
        return [self.path]

    def read_each(self, use: Callable[[str, IO[bytes]], T]) -> dict[str, T]:
        """``use(where, stream)`` of every member, by member name; the first copy of a member counts.

        One pass over the gzip stream, because seeking back in a .tar.gz inflates it again.
        """
        import tarfile  # here: 10 ms that a plan with a warm cache should not pay
        import zlib

        wanted = {f"{self.layout.folder}/{member}": member for member in self.layout.members}
        results: dict[str, T] = {}
        try:
            with tarfile.open(self.path, "r:gz") as tar:
                for entry in tar:
                    member = wanted.get(entry.name.removeprefix("./"))
                    if member is not None and member not in results and entry.isfile():
                        results[member] = use(f"{self.path}:{entry.name}", tar.extractfile(entry))
        except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
            raise DatasetCorruptError(
                f"{self.path} is truncated or not a .tar.gz ({one_line(error)}); download it again from {OFFICIAL_PAGE}"
            ) from error
        missing = [name for name, member in wanted.items() if member not in results]
        if missing:
            raise DatasetCorruptError(f"{self.path} lacks {', '.join(missing)}; download it again from {OFFICIAL_PAGE}")
        return results


def cifar_source(name: str, root: str | None) -> CifarFolder | CifarArchive:
    """Where ``name``'s reader reads from under ``root``: the extracted folder if there is one, else the archive."""
    layout = CIFAR_LAYOUTS[name]
    if root is None:
        raise DatasetNotFoundError(
            f"{layout.title} needs a data root: set the sweep key 'data_root' or env KDBENCH_DATA to a folder "
            f"holding {layout.folder}/ or {layout.archive} (download {layout.archive} from {OFFICIAL_PAGE})"
        )
    folder, archive = Path(root) / layout.folder, Path(root) / layout.archive
    if folder.is_dir():
        return CifarFolder(folder, layout)
    if archive.is_file():
        return CifarArchive(archive, layout)
    raise DatasetNotFoundError(
        f"{layout.title} not found: looked for {folder}/ and {archive} (the root comes from the sweep key "
        f"'data_root' or env KDBENCH_DATA); download {layout.archive} (python version) from {OFFICIAL_PAGE} "
        f"and extract it into {root}"
    )


def digits_file() -> Path:
    """The digits file inside the installed scikit-learn, found without importing sklearn (seconds)."""
    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise DatasetNotFoundError("digits ship inside scikit-learn, which this Python lacks; pip install scikit-learn")
    path = Path(locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise DatasetNotFoundError(
            f"digits: {path} is missing; reinstall scikit-learn (pip install --force-reinstall scikit-learn)"
        )
    return path


def _size_and_sha256(where: str, stream: IO[bytes]) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    while chunk := stream.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def _combined(members: dict[str, tuple[int, str]], order: tuple[str, ...]) -> str:
    lines = "".join(f"{member} {members[member][0]} {members[member][1]}\n" for member in order)
    return hashlib.sha256(lines.encode()).hexdigest()


def _cifar_fingerprint(name: str, root: str | None) -> str:
    source = cifar_source(name, root)
    return _cached(Path(root), source.path.name, source.files(),
                   lambda: _combined(source.read_each(_size_and_sha256), source.layout.members))


def _digits_fingerprint(name: str, root: str | None) -> str:
    path = digits_file()
    try:
        with path.open("rb") as stream:
            return _combined({path.name: _size_and_sha256(str(path), stream)}, (path.name,))
    except OSError as error:
        raise DatasetCorruptError(f"{path} cannot be read ({one_line(error)}); reinstall scikit-learn") from error


def _folder_fingerprint(name: str, root: str | None) -> str:
    """Every image and label file of the layout, by content, in the reader's order."""
    layout = scan(name, root)
    members = tuple(layout.paths())

    def content() -> str:
        hashed = {}
        for member in members:
            path = layout.folder / member
            try:
                with path.open("rb") as stream:
                    hashed[member] = _size_and_sha256(str(path), stream)
            except OSError as error:
                raise DatasetCorruptError(f"{path} cannot be read ({one_line(error)}); check it and its permissions") from error
        return _combined(hashed, members)

    return _cached(layout.folder, name, [layout.folder / member for member in members], content)


def _imagenet_fingerprint(name: str, root: str | None) -> str:
    """(relative path, size) of every file, in the reader's order: see the module docstring for why not content."""
    layout = scan(name, root)
    stats = _stats(layout.folder, [layout.folder / member for member in layout.paths()])
    return hashlib.sha256("".join(f"{member} {size}\n" for member, size, _ in stats).encode()).hexdigest()


FINGERPRINTS: dict[str, Callable[[str, str | None], str]] = {
    "cifar10": _cifar_fingerprint,
    "cifar100": _cifar_fingerprint,
    "digits": _digits_fingerprint,
    "tinyimagenet": _folder_fingerprint,
    "imagenette": _folder_fingerprint,
    "imagefolder": _folder_fingerprint,
    "imagenet": _imagenet_fingerprint,
}
"""One entry per data set; a new data set adds its own here, beside its reader module."""


def fingerprint(name: str, root: str | None) -> str:
    """The fingerprint of the files data set ``name``'s reader reads under ``root``.

    Raises DatasetError (one line, naming the file) when they are missing or unreadable, and
    KeyError for a data set that has no entry in FINGERPRINTS.
    """
    return FINGERPRINTS[name](name, root)


# --- the cache --------------------------------------------------------------------------------------


def user_cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kdbench" / "fingerprints.json"


def _stats(root: Path, paths: list[Path]) -> list[list[str | int]]:
    stats = []
    for path in paths:
        try:
            status = path.stat()
        except OSError as error:
            raise DatasetCorruptError(f"{path} cannot be read ({one_line(error)}); check it and its permissions") from error
        stats.append([path.relative_to(root).as_posix(), status.st_size, status.st_mtime_ns])
    return stats


def _cached(root: Path, source: str, paths: list[Path], compute: Callable[[], str]) -> str:
    """``compute()``, or what it gave before for these files with the same (name, size, mtime_ns).

    Looks beside the data first, then in the user's cache; stores into the first that can be
    written. Not stored: files that change while they are hashed, and files modified in the last
    ``_SETTLE_NS``, since a rewrite within the same clock tick would keep their stats (git's
    "racy clean" problem).
    """
    places = [(root / CACHE_NAME, source), (user_cache_file(), str(root.resolve() / source))]
    stats = _stats(root, paths)
    for cache, key in places:
        entry = _read_cache(cache).get(key)
        if isinstance(entry, dict) and entry.get("stats") == stats and isinstance(entry.get("fingerprint"), str):
            return entry["fingerprint"]
    value = compute()
    settled = all(time.time_ns() - mtime_ns > _SETTLE_NS for _, _, mtime_ns in stats)
    if settled and _stats(root, paths) == stats:
        for cache, key in places:
            if _store(cache, key, {"stats": stats, "fingerprint": value}):
                break
    return value


def _read_cache(cache: Path) -> dict:
    """The cache's entries; a missing, unreadable or foreign file is an empty cache, never an error."""
    try:
        content = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(content, dict) or content.get("format") != CACHE_FORMAT or not isinstance(content.get("entries"), dict):
        return {}
    return content["entries"]


def _store(cache: Path, key: str, entry: dict) -> bool:
    """Adds ``entry`` to ``cache``; False where the folder cannot be written (read-only data sets)."""
    entries = {**_read_cache(cache), key: entry}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cache, json.dumps({"format": CACHE_FORMAT, "entries": entries}, indent=1, sort_keys=True).encode())
    except OSError:
        return False
    return True


def write_atomic(path: Path, data: bytes) -> None:
    """Temp file + rename, so concurrent planners never see a torn cache; mode 0666 less the umask."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
