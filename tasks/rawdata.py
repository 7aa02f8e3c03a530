"""The raw-data format of data/: one Parquet table per split with columns path, class_name, image.

ingest writes it, prepare reads it. Encoded image files are stored as they came, so data/ is a
few large files rather than one file per image.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.errors import DataError
from tasks.sources import RawImage

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


def read_split(path: Path) -> pa.Table:
    if not path.is_file():
        raise DataError(f"{path} not found: run `visionops ingest` (or `dvc pull`) first")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file: {exc}; re-run `visionops ingest`") from exc
    missing = set(COLUMNS) - set(table.column_names)
    if missing:
        raise DataError(f"{path}: missing columns {sorted(missing)}; re-run `visionops ingest`")
    return table
