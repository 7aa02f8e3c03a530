"""Reading prepare's output: every malformed file is a DataError that names it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tasks.data.prepared import load_split
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
    np.testing.assert_array_equal(split.images, images)
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
