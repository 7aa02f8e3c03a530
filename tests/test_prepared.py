"""Reading prepare's output in pieces; every malformed file is a DataError that names it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tasks.data.prepared import PreparedImages, image_batches, load_split
from tasks.errors import DataError
from tasks.paths import Workspace


def write_split(ws: Workspace, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
    ws.prepared.mkdir(parents=True, exist_ok=True)
    np.save(ws.images("test"), images)
    np.save(ws.labels("test"), labels)
    ws.classes.write_text(json.dumps(classes))


def test_loads_images_labels_and_classes(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    images = np.arange(2 * 3 * 4 * 4, dtype=np.uint8).reshape(2, 3, 4, 4)
    write_split(ws, images, np.array([1, 0], dtype=np.int32), ["a", "b"])
    split = load_split(ws, "test")
    np.testing.assert_array_equal(split.images[:], images)
    assert split.images.shape == (2, 3, 4, 4) and split.images.nbytes == images.nbytes
    assert split.labels.dtype == np.int64 and split.labels.tolist() == [1, 0]
    assert split.classes == ["a", "b"]


def test_missing_file_names_it(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    with pytest.raises(DataError, match=r"test_images\.npy not found"):
        load_split(ws, "test")


@pytest.mark.parametrize(
    ("images", "labels", "match"),
    [
        (np.zeros((2, 3, 4, 4), dtype=np.float32), np.array([0, 1]), "expected uint8"),
        (np.zeros((2, 2, 4, 4), dtype=np.uint8), np.array([0, 1]), "C 1 or 3"),
        (np.zeros((2, 3, 4, 4), dtype=np.uint8), np.array([0]), "2 images but"),
        (np.zeros((0, 3, 4, 4), dtype=np.uint8), np.zeros(0, dtype=np.int64), "holds no images"),
        (np.zeros((2, 3, 4, 4), dtype=np.uint8), np.array([0, 2]), "labels outside 0..1"),
    ],
)
def test_malformed_split_is_a_data_error(tmp_path: Path, images: np.ndarray, labels: np.ndarray, match: str) -> None:
    ws = Workspace(tmp_path)
    write_split(ws, images, labels, ["a", "b"])
    with pytest.raises(DataError, match=match):
        load_split(ws, "test")


def test_slices_rows_and_batches_read_the_right_images(tmp_path: Path) -> None:
    path = tmp_path / "images.npy"
    images = np.random.default_rng(0).integers(0, 256, (11, 1, 3, 5), dtype=np.uint8)
    np.save(path, images)
    reader = PreparedImages(path)
    np.testing.assert_array_equal(reader[3:7], images[3:7])
    np.testing.assert_array_equal(reader[9:], images[9:])
    assert reader[20:].shape == (0, 1, 3, 5)
    rows = np.array([10, 0, 4, 4])
    np.testing.assert_array_equal(reader.take(rows), images[rows])
    out = np.zeros((2, 1, 3, 5), dtype=np.uint8)
    assert reader.read(5, out) is out
    np.testing.assert_array_equal(out, images[5:7])
    np.testing.assert_array_equal(np.concatenate(list(image_batches(reader, 4, "test"))), images)
    with pytest.raises(IndexError):
        reader.take(np.array([11]))
    with pytest.raises(TypeError, match="step 1"):
        reader[::2]


def test_a_file_written_by_open_memmap_reads_the_same(tmp_path: Path) -> None:
    """prepare writes its arrays with numpy.lib.format.open_memmap (version 1 or 2 headers)."""
    path = tmp_path / "images.npy"
    written = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(3, 3, 2, 2), version=(2, 0))
    written[:] = np.arange(36, dtype=np.uint8).reshape(3, 3, 2, 2)
    written.flush()
    del written
    np.testing.assert_array_equal(PreparedImages(path)[:], np.arange(36, dtype=np.uint8).reshape(3, 3, 2, 2))


def test_a_truncated_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "train_images.npy"
    np.save(path, np.zeros((4, 3, 8, 8), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"train_images\.npy"):
        PreparedImages(path)


def test_reading_does_not_map_the_file_into_the_process(tmp_path: Path) -> None:
    """pread, not mmap: after reading every image, no mapping of the file is left in /proc/self/maps."""
    path = tmp_path / "big_images.npy"
    np.save(path, np.zeros((64, 3, 16, 16), dtype=np.uint8))
    reader = PreparedImages(path)
    for _ in image_batches(reader, 8, "test"):
        pass
    reader.take(np.arange(64))
    assert str(path) not in Path("/proc/self/maps").read_text()  # Linux, as the project's machines are
