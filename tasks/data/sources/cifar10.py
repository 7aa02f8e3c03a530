"""CIFAR-10 from its official binary archive, checksum-verified and parsed without unpickling.

The binary version is fixed-length records: 1 label byte, then 3072 pixel bytes (1024 red,
1024 green, 1024 blue, row-major 32x32). Only the expected members are read from the archive;
nothing is extracted to disk.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

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


def parse_batch(raw: bytes, member: str, class_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,), pixels (N, 32, 32, 3) uint8) of one ``*.bin`` member."""
    if not raw or len(raw) % RECORD:
        raise DataError(f"{member}: {len(raw)} bytes is not a whole number of {RECORD}-byte CIFAR-10 records")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= len(class_names):
        raise DataError(f"{member}: label {int(labels.max())} but {META} names only {len(class_names)} classes")
    pixels = records[:, 1:].reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1)
    return labels, np.ascontiguousarray(pixels)


def read_archive(archive: Path) -> RawDataset:
    wanted = {f"{FOLDER}/{name}" for names in BATCHES.values() for name in names} | {f"{FOLDER}/{META}"}
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    handle = tar.extractfile(member)
                    assert handle is not None  # a regular file always has a payload
                    members[member.name] = handle.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{archive}: not a readable CIFAR-10 binary archive: {exc}") from exc
    missing = sorted(wanted - set(members))
    if missing:
        raise DataError(f"{archive}: missing {', '.join(missing)}: is this the binary version ({URL})?")
    class_names = [line.strip() for line in members[f"{FOLDER}/{META}"].decode("ascii").splitlines() if line.strip()]
    splits: dict[str, list[RawImage]] = {}
    for split, names in BATCHES.items():
        images: list[RawImage] = []
        for name in names:
            labels, pixels = parse_batch(members[f"{FOLDER}/{name}"], name, class_names)
            images.extend(
                RawImage(path=f"{name}/{i:05d}.png", class_name=class_names[label], image=encode_png(pixels[i]))
                for i, label in enumerate(labels.tolist())
            )
        splits[split] = images
    return RawDataset(
        source="cifar10",
        splits=splits,
        details={"url": URL, "archive_md5": MD5},
    )


def load(cache_dir: Path, url: str = URL, md5: str = MD5) -> RawDataset:
    """Download (or reuse the cached copy of) the archive, verify its md5, parse it."""
    archive = downloads.fetch(url, cache_dir / Path(URL).name, md5=md5)
    dataset = read_archive(archive)
    dataset.details.update({"url": url, "archive_md5": md5})
    return dataset
