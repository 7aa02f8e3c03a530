"""CIFAR-10 from its official binary archive, checksum-verified and parsed without unpickling.

The binary version is fixed-length records: 1 label byte, then 3072 pixel bytes (1024 red,
1024 green, 1024 blue, row-major 32x32). Only the expected members are read from the archive,
one batch (30 MB) at a time; nothing is extracted to disk.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np

from tasks.data import downloads
from tasks.data.imaging import encode_png
from tasks.data.raw import RawDataset, RawImage
from tasks.errors import DataError

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
MD5 = "c32a1d4ab5d03f1284b67883e8d87530"  # published on https://www.cs.toronto.edu/~kriz/cifar.html
FOLDER = "cifar-10-batches-bin"
BATCHES = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
META = "batches.meta.txt"
SIDE = 32  # px
RECORD = 1 + 3 * SIDE * SIDE  # bytes: label + R, G, B planes


def _check_size(size: int, member: str) -> None:
    if not size or size % RECORD:
        raise DataError(f"{member}: {size} bytes is not a whole number of {RECORD}-byte CIFAR-10 records")


def parse_batch(raw: bytes, member: str, class_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,), pixels (N, 32, 32, 3) uint8) of one ``*.bin`` member."""
    _check_size(len(raw), member)
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= len(class_names):
        raise DataError(f"{member}: label {int(labels.max())} but {META} names only {len(class_names)} classes")
    pixels = records[:, 1:].reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1)
    return labels, np.ascontiguousarray(pixels)


def _members(
    archive: Path, wanted: set[str], read: set[str] | None = None
) -> Iterator[tuple[tarfile.TarInfo, bytes]]:
    """The ``wanted`` members of the archive, one at a time, in archive order, with the bytes of those
    in ``read`` (default: all of them)."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            while (member := tar.next()) is not None:
                if member.name in wanted and member.isfile():
                    handle = tar.extractfile(member)
                    assert handle is not None  # a regular file always has a payload
                    yield member, handle.read() if read is None or member.name in read else b""
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{archive}: not a readable CIFAR-10 binary archive: {exc}") from exc


def read_archive(archive: Path) -> RawDataset:
    """The dataset in ``archive``: class names read first, then the batches streamed one at a time."""
    split_of = {f"{FOLDER}/{name}": split for split, names in BATCHES.items() for name in names}
    found: dict[str, bytes] = {}
    records = 0
    for member, data in _members(archive, {f"{FOLDER}/{META}", *split_of}, read={f"{FOLDER}/{META}"}):
        found[member.name] = data
        if member.name in split_of:
            _check_size(member.size, PurePosixPath(member.name).name)
            records += member.size // RECORD
    missing = sorted({f"{FOLDER}/{META}", *split_of} - set(found))
    if missing:
        raise DataError(f"{archive}: missing {', '.join(missing)}: is this the binary version ({URL})?")
    meta = found[f"{FOLDER}/{META}"]
    class_names = [line.strip() for line in meta.decode("ascii").splitlines() if line.strip()]

    def images() -> Iterator[tuple[str, RawImage]]:
        for info, raw in _members(archive, set(split_of)):
            name = PurePosixPath(info.name).name
            labels, pixels = parse_batch(raw, name, class_names)
            del raw
            for i, label in enumerate(labels.tolist()):
                yield split_of[info.name], RawImage(f"{name}/{i:05d}.png", class_names[label], encode_png(pixels[i]))

    return RawDataset(source="cifar10", images=images, total=records, details={"url": URL, "archive_md5": MD5})


def load(cache_dir: Path, url: str = URL, md5: str = MD5) -> RawDataset:
    """Download (or reuse the cached copy of) the archive, verify its md5, parse it."""
    archive = downloads.fetch(url, cache_dir / Path(URL).name, md5=md5)
    dataset = read_archive(archive)
    dataset.details.update({"url": url, "archive_md5": md5})
    return dataset
