"""Raw data: the images a source yields (`RawDataset`), and their format in data/.

data/ holds one Parquet table per split with columns path, class_name, image. ingest writes it,
prepare reads it. Encoded image files are stored as they came, so data/ is a few large files
rather than one file per image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.errors import DataError
from tasks.paths import SPLITS


@dataclass(frozen=True)
class RawImage:
    path: str  # source-relative, POSIX separators; unique within the dataset
    class_name: str
    image: bytes  # the encoded file exactly as the source holds it


@dataclass(frozen=True)
class RawDataset:
    source: str
    splits: dict[str, list[RawImage]]
    details: dict[str, Any] = field(default_factory=dict)  # archive checksum, split rule, ignored files

    def class_names(self) -> list[str]:
        return sorted({img.class_name for images in self.splits.values() for img in images})

    def counts(self) -> dict[str, dict[str, int]]:
        result: dict[str, dict[str, int]] = {}
        for split in SPLITS:
            per_class: dict[str, int] = {}
            for img in self.splits[split]:
                per_class[img.class_name] = per_class.get(img.class_name, 0) + 1
            result[split] = dict(sorted(per_class.items()))
        return result


ROW_GROUP = 4096  # images per Parquet row group: bounded memory for readers
COLUMNS = ("path", "class_name", "image")


def write_split(images: list[RawImage], path: Path) -> None:
    """One split as one Parquet file (path, class_name, image); deterministic bytes."""
    table = pa.table(
        {
            "path": pa.array([img.path for img in images], pa.string()),
            "class_name": pa.array([img.class_name for img in images], pa.string()),
            "image": pa.array([img.image for img in images], pa.large_binary()),
        }
    )
    # Encoded images are already compressed; compressing them again only costs time.
    pq.write_table(
        table,
        path,
        row_group_size=ROW_GROUP,
        compression={"path": "zstd", "class_name": "zstd", "image": "none"},
        use_dictionary=["class_name"],
        write_statistics=["path", "class_name"],
    )


def read_split(path: Path, columns: list[str] | None = None) -> pa.Table:
    """One split's table (all columns by default); :class:`DataError` naming the file if unusable."""
    if not path.is_file():
        raise DataError(f"{path} not found: run `visionops ingest` (or `dvc pull`) first")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file: {exc}; re-run `visionops ingest`") from exc
    missing = set(COLUMNS) - set(schema.names)
    if missing:
        raise DataError(f"{path}: missing columns {sorted(missing)}; re-run `visionops ingest`")
    return pq.read_table(path, columns=columns)


def read_labels(path: Path) -> tuple[list[str], list[str]]:
    """The (path, class_name) columns of one split, without the image bytes."""
    table = read_split(path, columns=["path", "class_name"])
    return table.column("path").to_pylist(), table.column("class_name").to_pylist()


def row_groups(path: Path) -> tuple[list[int], int]:
    """Row-group indices and the row count of one split: the units prepare decodes in parallel."""
    meta = pq.ParquetFile(path).metadata
    return list(range(meta.num_row_groups)), meta.num_rows


def read_images(path: Path, group: int) -> list[bytes]:
    """The encoded images of one row group."""
    return pq.ParquetFile(path).read_row_group(group, columns=["image"]).column("image").to_pylist()
