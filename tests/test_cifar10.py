"""tasks/data/sources/cifar10.py: the official binary format, parsed without unpickling, checksum-verified."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tasks.data.imaging import to_array
from tasks.data.sources import cifar10
from tasks.errors import DataError

from conftest import collect

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _batch(rng: np.random.Generator, n: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    pixels = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)  # R, G, B planes, row-major
    records = np.concatenate([labels[:, None], pixels.reshape(n, -1)], axis=1)
    return records.tobytes(), labels, pixels


def _archive(path: Path, per_batch: int = 3, members: dict[str, bytes] | None = None) -> dict[str, tuple]:
    """A cifar-10-binary.tar.gz in the exact published layout, with random records."""
    rng = np.random.default_rng(0)
    truth = {}
    files = {f"{cifar10.FOLDER}/{cifar10.META}": ("\n".join(CLASSES) + "\n\n").encode()}
    for name in cifar10.BATCHES["train"] + cifar10.BATCHES["test"]:
        raw, labels, pixels = _batch(rng, per_batch)
        files[f"{cifar10.FOLDER}/{name}"] = raw
        truth[name] = (labels, pixels)
    files.update(members or {})
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return truth


def test_binary_records_become_the_same_pixels_and_labels(tmp_path: Path) -> None:
    truth = _archive(tmp_path / "c.tar.gz")
    dataset = cifar10.read_archive(tmp_path / "c.tar.gz")
    data = collect(dataset)
    assert len(data["train"]) == 15 and len(data["test"]) == 3 and dataset.total == 18
    first = data["train"][0]
    labels, pixels = truth["data_batch_1.bin"]
    assert first.class_name == CLASSES[labels[0]]
    assert first.path == "data_batch_1.bin/00000.png"
    np.testing.assert_array_equal(to_array(first.image, 32, 3), pixels[0])
    test_labels, test_pixels = truth["test_batch.bin"]
    assert data["test"][2].class_name == CLASSES[test_labels[2]]
    np.testing.assert_array_equal(to_array(data["test"][2].image, 32, 3), test_pixels[2])


def test_download_verifies_the_md5_and_caches(tmp_path: Path) -> None:
    archive = tmp_path / "served.tar.gz"
    _archive(archive)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    data = cifar10.load(tmp_path / "cache", url=archive.as_uri(), md5=md5)
    assert data.details["archive_md5"] == md5
    cached = tmp_path / "cache" / "cifar-10-binary.tar.gz"
    assert cached.read_bytes() == archive.read_bytes()
    archive.unlink()  # a second load must come from the cache, not the URL
    assert collect(cifar10.load(tmp_path / "cache", url=archive.as_uri(), md5=md5)) == collect(data)


def test_an_archive_without_the_published_checksum_is_refused_and_deleted(tmp_path: Path) -> None:
    archive = tmp_path / "served.tar.gz"
    _archive(archive)  # well-formed, but not the file published on https://www.cs.toronto.edu/~kriz/cifar.html
    with pytest.raises(DataError, match=r"checksum mismatch .* expected c32a1d4ab5d03f1284b67883e8d87530"):
        cifar10.load(tmp_path / "cache", url=archive.as_uri())  # the default checksum is the published one
    assert not list((tmp_path / "cache").iterdir())


def test_truncated_batch_is_named(tmp_path: Path) -> None:
    _archive(tmp_path / "c.tar.gz", members={f"{cifar10.FOLDER}/data_batch_3.bin": b"\x01" * 100})
    with pytest.raises(DataError, match=r"data_batch_3\.bin: 100 bytes is not a whole number"):
        cifar10.read_archive(tmp_path / "c.tar.gz")


def test_missing_member_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(f"{cifar10.FOLDER}/{cifar10.META}")
        info.size = 0
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(DataError, match=r"missing .*data_batch_1\.bin"):
        cifar10.read_archive(path)


def test_python_pickle_version_is_refused(tmp_path: Path) -> None:
    """The pickled version has other member names; it is never unpickled, just refused."""
    path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"\x80\x04N."))
    with pytest.raises(DataError, match="binary version"):
        cifar10.read_archive(path)
