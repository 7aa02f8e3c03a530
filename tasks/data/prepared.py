"""Reading prepare's output: one split's uint8 images and labels, checked against classes.json."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from tasks.errors import DataError
from tasks.fs.hashing import files_digest
from tasks.paths import Workspace


@dataclass(frozen=True)
class PreparedSplit:
    images: np.ndarray  # uint8 (N, C, H, W), C 1 or 3
    labels: np.ndarray  # int64 (N,)
    classes: list[str]  # index = label


def load_split(ws: Workspace, split: str) -> PreparedSplit:
    """The prepared ``split``; a missing, empty or malformed file is a :class:`DataError` naming it."""
    for path in (ws.images(split), ws.labels(split), ws.classes):
        if not path.is_file():
            raise DataError(f"{path} not found: run the prepare stage first (dvc repro prepare)")
    images = np.load(ws.images(split), allow_pickle=False)
    labels = np.load(ws.labels(split), allow_pickle=False)
    classes = json.loads(ws.classes.read_text())
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise DataError(
            f"{ws.images(split)}: expected uint8 (N, C, H, W) with C 1 or 3, got {images.dtype} {images.shape};"
            " rerun the prepare stage"
        )
    if labels.shape != (images.shape[0],):
        raise DataError(f"{ws.images(split)}: {images.shape[0]} images but {labels.shape} labels in {ws.labels(split)}")
    if len(labels) == 0:
        raise DataError(f"{ws.images(split)} holds no images: rerun prepare on a source with a {split} split")
    if labels.min() < 0 or labels.max() >= len(classes):
        raise DataError(f"{ws.labels(split)} has labels outside 0..{len(classes) - 1} ({ws.classes}): rerun prepare")
    return PreparedSplit(images, labels.astype(np.int64), list(classes))


@dataclass(frozen=True)
class PreparedData:
    """Both splits of prepared/, checked to agree in shape, and a digest of the files they came from."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]
    digest: str

    @classmethod
    def load(cls, ws: Workspace) -> PreparedData:
        train, test = load_split(ws, "train"), load_split(ws, "test")
        if train.images.shape[1:] != test.images.shape[1:]:
            shapes = f"{train.images.shape[1:]} vs {test.images.shape[1:]}"
            raise DataError(f"train and test images differ in shape ({shapes}): rerun the prepare stage")
        files = [ws.images("train"), ws.labels("train"), ws.images("test"), ws.labels("test"), ws.classes]
        return cls(train.images, train.labels, test.images, test.labels, train.classes, files_digest(files))
