"""Raw data: the images a source yields (`RawDataset`, streamed), and their format in data/.

data/ holds each split as Parquet shards ``{split}-00000.parquet``, ``{split}-00001.parquet``, ...
with columns path, class_name, image (the encoded file exactly as the source holds it), plus
source.json. Shards are written one bounded row group at a time and closed at a bounded size,
so neither ingest nor a reader ever holds a whole split, and DVC tracks tens of files, not one
per image.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.errors import DataError, os_error_code
from tasks.paths import SPLITS

COLUMNS = ("path", "class_name", "image")
SCHEMA = pa.schema([("path", pa.string()), ("class_name", pa.string()), ("image", pa.large_binary())])
MAX_GROUP_ROWS = 4096  # images per row group at most, however small they are
SHARD_PATTERN = "{split}-{index:05d}.parquet"
# A class name becomes a folder name, a label line and a JSON string: no separators, no control characters.
_BAD_CLASS_NAME = re.compile(r"[/\\\x00-\x1f\x7f]")


@dataclass(frozen=True)
class RawImage:
    path: str  # source-relative, POSIX separators; unique within the dataset
    class_name: str
    image: bytes  # the encoded file exactly as the source holds it


@dataclass(frozen=True)
class RawDataset:
    """A source, ready to stream: ``images()`` yields (split, image) one encoded image at a time."""

    source: str
    images: Callable[[], Iterator[tuple[str, RawImage]]]
    total: int | None = None  # images, when known before reading (for progress)
    details: dict[str, Any] = field(default_factory=dict)  # archive checksum, split rule, ignored files

    @classmethod
    def of(cls, source: str, splits: dict[str, list[RawImage]], details: dict[str, Any] | None = None) -> RawDataset:
        """A dataset already in memory (generated test data)."""

        def images() -> Iterator[tuple[str, RawImage]]:
            for split in SPLITS:
                for image in splits.get(split, []):
                    yield split, image

        return cls(source, images, sum(len(v) for v in splits.values()), dict(details or {}))


def check_classes(names: list[str], where: str) -> None:
    """:class:`DataError` for fewer than two classes, or a name that cannot be a folder, a label line or a key."""
    if len(names) < 2:
        raise DataError(
            f"{where}: only one class ({', '.join(names) or 'none'}): a classifier needs at least two;"
            " give one folder of images per class"
        )
    for name in names:
        if not name.strip() or name in (".", "..") or _BAD_CLASS_NAME.search(name):
            raise DataError(
                f"{where}: class name {name!r} contains a path separator, a newline or another control"
                " character (or is empty): rename that class folder"
            )


@dataclass(frozen=True)
class ShardLimits:
    shard_bytes: int  # encoded image bytes per shard file
    row_group_bytes: int  # encoded image bytes per row group (what the writer buffers)


class ShardWriter:
    """Appends one split's images to ``folder/{split}-NNNNN.parquet``, a bounded row group at a time.

    The same images in the same order give the same bytes (no timestamps in Parquet files).
    """

    def __init__(self, folder: Path, split: str, limits: ShardLimits) -> None:
        self.folder, self.split, self.limits = folder, split, limits
        self.shards: list[Path] = []
        self._writer: pq.ParquetWriter | None = None
        self._shard_bytes = 0
        self._new_group()

    def _new_group(self) -> None:
        # The group's images in one growing buffer, not one object each: a freed buffer is reused
        # whole, where thousands of small ones fragment the heap and keep the process growing.
        self._images = bytearray()
        self._offsets = [0]
        self._paths: list[str] = []
        self._classes: list[str] = []

    def add(self, image: RawImage) -> None:
        self._images += image.image
        self._offsets.append(len(self._images))
        self._paths.append(image.path)
        self._classes.append(image.class_name)
        if len(self._images) >= self.limits.row_group_bytes or len(self._paths) >= MAX_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self._paths:
            return
        try:
            self._write_group()
        except OSError as exc:
            raise _naming(exc, self.shards[-1]) from exc

    def _write_group(self) -> None:
        if self._writer is None:
            path = self.folder / SHARD_PATTERN.format(split=self.split, index=len(self.shards))
            self.shards.append(path)
            # Encoded images are already compressed; compressing them again only costs time.
            self._writer = pq.ParquetWriter(
                path,
                SCHEMA,
                compression={"path": "zstd", "class_name": "zstd", "image": "none"},
                use_dictionary=["class_name"],
                write_statistics=["path", "class_name"],
            )
        offsets = pa.py_buffer(np.array(self._offsets, dtype=np.int64))
        images = pa.LargeBinaryArray.from_buffers(
            pa.large_binary(), len(self._paths), [None, offsets, pa.py_buffer(self._images)]
        )
        table = pa.table(
            {
                "path": pa.array(self._paths, pa.string()),
                "class_name": pa.array(self._classes, pa.string()),
                "image": images,
            },
            schema=SCHEMA,
        )
        self._writer.write_table(table, row_group_size=len(self._paths))
        self._shard_bytes += len(self._images)
        del table, images
        self._new_group()
        if self._shard_bytes >= self.limits.shard_bytes:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is not None:
            writer, self._writer, self._shard_bytes = self._writer, None, 0
            try:
                writer.close()
            except OSError as exc:
                raise _naming(exc, self.shards[-1]) from exc

    def close(self) -> list[Path]:
        """Flush and close; the shard files written, in order."""
        self._flush()
        self._close_shard()
        return self.shards


def _naming(exc: OSError, path: Path) -> OSError:
    """``exc`` naming ``path``: Arrow's write errors (a full disk) name no file."""
    code = os_error_code(exc)
    return OSError(code, os.strerror(code) if code is not None else str(exc), str(path))


def shards(data: Path, split: str) -> list[Path]:
    """The shard files of ``split`` in data/, in order; :class:`DataError` if there are none."""
    found = sorted(data.glob(f"{split}-*.parquet"))
    if not found:
        raise DataError(
            f"{data} has no {split} shards ({split}-*.parquet): run `visionops ingest` (or `dvc pull`) first"
        )
    return found


def damaged(path: Path, exc: Exception, where: str = "") -> DataError:
    """The error for a shard that cannot be read (``where``: e.g. " row group 3")."""
    return DataError(
        f"{path}{where}: unreadable Parquet ({' '.join(str(exc).split())}); data/ is damaged: restore it with"
        " `dvc checkout data.dvc` (or `dvc pull`), or run `visionops ingest` again"
    )


def parquet_file(path: Path) -> pq.ParquetFile:
    """An open shard with the expected columns; :class:`DataError` naming the file if unusable."""
    try:
        shard = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise damaged(path, exc) from exc
    missing = set(COLUMNS) - set(shard.schema_arrow.names)
    if missing:
        raise DataError(f"{path}: missing columns {sorted(missing)}; run `visionops ingest` again")
    return shard


@dataclass(frozen=True)
class RowGroup:
    """A unit of work over data/: one row group of one shard, at ``start`` in its split."""

    path: Path
    group: int
    start: int  # row of the split where this group begins
    rows: int


def row_groups(data: Path, split: str) -> list[RowGroup]:
    """Every row group of ``split``, in order, with its place in the split."""
    units: list[RowGroup] = []
    start = 0
    for path in shards(data, split):
        meta = parquet_file(path).metadata
        for group in range(meta.num_row_groups):
            rows = meta.row_group(group).num_rows
            units.append(RowGroup(path, group, start, rows))
            start += rows
    return units


def read_group(unit: RowGroup, columns: list[str]) -> pa.Table:
    """``columns`` of one row group; :class:`DataError` naming the shard and group if unreadable."""
    try:
        return parquet_file(unit.path).read_row_group(unit.group, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise damaged(unit.path, exc, f" row group {unit.group}") from exc


def class_names(data: Path) -> list[str]:
    """Every class name in data/, sorted: the dictionaries of the class_name column, no image bytes."""
    names: set[str] = set()
    for split in SPLITS:
        for path in shards(data, split):
            try:
                table = pq.read_table(path, columns=["class_name"], read_dictionary=["class_name"])
            except (pa.ArrowException, OSError) as exc:
                raise damaged(path, exc) from exc
            for chunk in table.column("class_name").chunks:
                names.update(chunk.dictionary.to_pylist())
    return sorted(names)
