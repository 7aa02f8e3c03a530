"""Reading prepare's output: one split's uint8 images and labels, checked against classes.json.

The images are never loaded whole. `PreparedImages` reads a split's ``.npy`` file in pieces with
``pread`` into buffers the caller owns: a contiguous range for scoring, any set of rows for a
training batch. Reading through ``np.memmap`` instead would leave every page it touched mapped into
the process, so its resident size would grow to the size of the split; with ``pread`` it stays at
the batches in flight, and the page cache (which the kernel reclaims freely) holds the rest.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from tasks.errors import DataError
from tasks.fs.hashing import files_digest
from tasks.fs.progress import track
from tasks.paths import Workspace

log = logging.getLogger(__name__)


class Images(Protocol):
    """uint8 images (N, C, H, W) that slice into arrays: a `PreparedImages` file or an array in memory."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: slice, /) -> np.ndarray: ...


class PreparedImages:
    """One split's uint8 (N, C, H, W) ``.npy`` file, read in pieces (its header read by ``np.load``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            mapped = np.load(self.path, mmap_mode="r", allow_pickle=False)  # maps, reads only the header
        except (ValueError, OSError) as exc:
            raise DataError(f"{self.path} is not a readable .npy array ({exc}); rerun the prepare stage") from exc
        if (
            not isinstance(mapped, np.memmap)
            or mapped.dtype != np.uint8
            or mapped.ndim != 4
            or mapped.shape[1] not in (1, 3)
        ):
            raise DataError(
                f"{self.path}: expected uint8 (N, C, H, W) with C 1 or 3, got {mapped.dtype} {mapped.shape};"
                " rerun the prepare stage"
            )
        if not mapped.flags.c_contiguous:
            raise DataError(f"{self.path} is stored in Fortran order; rerun the prepare stage")
        self.shape: tuple[int, int, int, int] = tuple(int(v) for v in mapped.shape)  # type: ignore[assignment]
        self.offset = int(mapped.offset)
        del mapped
        self.image_bytes = math.prod(self.shape[1:])
        size = self.path.stat().st_size
        if size < self.offset + self.nbytes:
            raise DataError(f"{self.path} is truncated ({size} bytes for {self.shape}); rerun the prepare stage")

    @property
    def nbytes(self) -> int:
        return len(self) * self.image_bytes

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice, /) -> np.ndarray:
        """Rows ``index`` (a slice with step 1) as a new array: one read."""
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError(f"PreparedImages takes slices with step 1, got {index!r}; use take() for rows")
        start, stop, _ = index.indices(len(self))
        return self.read(start, np.empty((max(0, stop - start), *self.shape[1:]), dtype=np.uint8))

    def read(self, start: int, out: np.ndarray) -> np.ndarray:
        """Images ``start .. start + len(out)`` into ``out`` (C-contiguous uint8): one read."""
        if start < 0 or start + len(out) > len(self):
            raise IndexError(f"rows {start}..{start + len(out) - 1} outside 0..{len(self) - 1} of {self.path}")
        if len(out):
            fd = os.open(self.path, os.O_RDONLY)
            try:
                self._read_into(fd, out, start)
            finally:
                os.close(fd)
        return out

    def take(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Images ``rows`` (any order, repeats allowed) into ``out`` (a new array when None)."""
        if out is None:
            out = np.empty((len(rows), *self.shape[1:]), dtype=np.uint8)
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= len(self)):
            raise IndexError(f"rows outside 0..{len(self) - 1} of {self.path}")
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for i, row in enumerate(rows.tolist()):
                self._read_into(fd, out[i : i + 1], row)
        finally:
            os.close(fd)
        return out

    def _read_into(self, fd: int, out: np.ndarray, first: int) -> None:
        view = out.data.cast("B")  # out is C-contiguous: its bytes in file order
        position = self.offset + first * self.image_bytes
        while view.nbytes:  # pread may return less than asked; loop until the buffer is full
            got = os.preadv(fd, [view], position)
            if got == 0:
                raise DataError(f"{self.path} ended early at byte {position}; rerun the prepare stage")
            view, position = view[got:], position + got


def image_batches(images: Images, batch_size: int, what: str) -> Iterator[np.ndarray]:
    """Every image once, in order, ``batch_size`` at a time, with progress."""
    starts = range(0, len(images), batch_size)
    for start in track(starts, len(starts), what, log):
        yield np.ascontiguousarray(images[start : start + batch_size])


@dataclass(frozen=True)
class PreparedSplit:
    images: PreparedImages  # uint8 (N, C, H, W), C 1 or 3, read in pieces
    labels: np.ndarray  # int64 (N,), in memory (8 bytes an image)
    classes: list[str]  # index = label


def load_split(ws: Workspace, split: str) -> PreparedSplit:
    """The prepared ``split``; a missing, empty or malformed file is a :class:`DataError` naming it."""
    for path in (ws.images(split), ws.labels(split), ws.classes):
        if not path.is_file():
            raise DataError(f"{path} not found: run the prepare stage first (dvc repro prepare)")
    images = PreparedImages(ws.images(split))
    labels = np.load(ws.labels(split), allow_pickle=False)
    classes = json.loads(ws.classes.read_text())
    if labels.shape != (len(images),):
        raise DataError(f"{ws.images(split)}: {len(images)} images but {labels.shape} labels in {ws.labels(split)}")
    if len(labels) == 0:
        raise DataError(f"{ws.images(split)} holds no images: rerun prepare on a source with a {split} split")
    if labels.min() < 0 or labels.max() >= len(classes):
        raise DataError(f"{ws.labels(split)} has labels outside 0..{len(classes) - 1} ({ws.classes}): rerun prepare")
    return PreparedSplit(images, labels.astype(np.int64), list(classes))


@dataclass(frozen=True)
class PreparedData:
    """Both splits of prepared/, checked to agree in shape, and a digest of the files they came from."""

    train: PreparedSplit
    test: PreparedSplit
    digest: str

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    @property
    def nbytes(self) -> int:
        """Decoded pixels of both splits: what holding them on the device costs."""
        return self.train.images.nbytes + self.test.images.nbytes

    @classmethod
    def load(cls, ws: Workspace) -> PreparedData:
        train, test = load_split(ws, "train"), load_split(ws, "test")
        if train.images.shape[1:] != test.images.shape[1:]:
            shapes = f"{train.images.shape[1:]} vs {test.images.shape[1:]}"
            raise DataError(f"train and test images differ in shape ({shapes}): rerun the prepare stage")
        files = [ws.images("train"), ws.labels("train"), ws.images("test"), ws.labels("test"), ws.classes]
        return cls(train, test, files_digest(files))
