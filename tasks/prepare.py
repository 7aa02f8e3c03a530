"""prepare: decode data/ once into uint8 tensors per split, plus a manifest with one row per image.

Undecodable files never stop the stage: they get a manifest row (``decoded`` false, ``error``)
and are listed by path in prepare_report.json, for validate to fail on with their names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks import params
from tasks.data.imaging import convert, decode
from tasks.data.raw import read_images, read_labels, row_groups
from tasks.data.reports import CorruptFile, PrepareReport, SourceSummary, SplitCounts
from tasks.entry import StageSpec, run_stage
from tasks.errors import DataError
from tasks.params import DataParams
from tasks.paths import SPLITS, Workspace

log = logging.getLogger(__name__)

POOL_MIN = 8192  # images in a split before a process pool pays for its start-up
STATS_SLICE = 256  # images per float32 block when computing mean/std
PROGRESS_EVERY = 10_000  # images between progress log lines
MAX_REPORTED_CORRUPT = 1000  # corrupt files listed in prepare_report.json; the rest only counted

MANIFEST_SCHEMA = pa.schema(
    [
        ("split", pa.string()),
        ("index", pa.int64()),  # row in {split}_images.npy; -1 when not decoded
        ("label", pa.int64()),
        ("class_name", pa.string()),
        ("content_hash", pa.string()),  # blake2b-128 of the converted pixels; null when not decoded
        ("path", pa.string()),
        ("height", pa.int64()),  # of the original image
        ("width", pa.int64()),
        ("channels", pa.int64()),
        ("mean", pa.float64()),  # of the converted pixels, 0..1
        ("std", pa.float64()),
        ("decoded", pa.bool_()),
        ("error", pa.string()),
    ]
)


@dataclass(frozen=True)
class DecodedChunk:
    pixels: np.ndarray  # (n_decoded, C, H, W) uint8
    ok: list[bool]
    height: list[int | None]
    width: list[int | None]
    channels: list[int | None]
    content_hash: list[str | None]
    mean: list[float | None]
    std: list[float | None]
    error: list[str | None]


def _pixel_stats(stacked: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-image mean and std on the 0..1 scale, a slice at a time to bound memory for large images."""
    means: list[float] = []
    stds: list[float] = []
    for i in range(0, len(stacked), STATS_SLICE):
        flat = stacked[i : i + STATS_SLICE].reshape(min(STATS_SLICE, len(stacked) - i), -1).astype(np.float32) / 255.0
        means += flat.mean(axis=1).tolist()
        stds += flat.std(axis=1).tolist()
    return means, stds


def decode_chunk(encoded: list[bytes], image_size: int, channels: int) -> DecodedChunk:
    """Decode and convert a list of encoded images; failures are recorded, never raised."""
    arrays: list[np.ndarray] = []
    ok: list[bool] = []
    height: list[int | None] = []
    width: list[int | None] = []
    bands: list[int | None] = []
    hashes: list[str | None] = []
    errors: list[str | None] = []
    for data in encoded:
        try:
            img = decode(data)
            size, n_bands = img.size, len(img.getbands())
            pixels = convert(img, image_size, channels)
        except DataError as exc:
            ok.append(False)
            errors.append(str(exc))
            for column in (height, width, bands, hashes):
                column.append(None)
            continue
        arrays.append(pixels)
        ok.append(True)
        errors.append(None)
        width.append(size[0])
        height.append(size[1])
        bands.append(n_bands)
        hashes.append(hashlib.blake2b(pixels.tobytes(), digest_size=16).hexdigest())
    stacked = np.stack(arrays) if arrays else np.empty((0, channels, image_size, image_size), np.uint8)
    means, stds = (iter(v) for v in _pixel_stats(stacked))
    mean = [next(means) if good else None for good in ok]
    std = [next(stds) if good else None for good in ok]
    return DecodedChunk(stacked, ok, height, width, bands, hashes, mean, std, errors)


def _decode_group(path: Path, group: int, image_size: int, channels: int) -> DecodedChunk:
    """One Parquet row group, read by the worker itself: no image bytes cross process boundaries."""
    return decode_chunk(read_images(path, group), image_size, channels)


def _decode_split(path: Path, image_size: int, channels: int, split: str) -> list[DecodedChunk]:
    groups, total = row_groups(path)
    workers = min(os.cpu_count() or 1, len(groups))
    start, done, next_log = time.perf_counter(), 0, PROGRESS_EVERY
    results: list[DecodedChunk] = []

    def progress(chunk: DecodedChunk) -> None:
        nonlocal done, next_log
        results.append(chunk)
        done += len(chunk.ok)
        if done >= next_log or done == total:
            rate = done / max(time.perf_counter() - start, 1e-9)
            log.info("prepare %s: decoded %d/%d images (%.0f images/s)", split, done, total, rate)
            next_log += PROGRESS_EVERY

    if total < POOL_MIN or workers < 2:
        for group in groups:
            progress(_decode_group(path, group, image_size, channels))
    else:
        n = len(groups)
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for chunk in pool.map(_decode_group, [path] * n, groups, [image_size] * n, [channels] * n):
                progress(chunk)
    return results


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


SPEC = StageSpec(
    "prepare",
    # data.source only to notice a source changed without `visionops ingest` (check_ingested)
    params=("data.source", "data.image_size", "data.channels"),
    reads=lambda ws: [ws.data],
    writes=lambda ws: [ws.prepared],
)


def check_ingested(p: DataParams, ws: Workspace) -> None:
    """data/ must be what data.source names: a source changed in params.yaml but never ingested
    would otherwise be prepared from the old data without a word. (data/ written by other means
    than ingest, without source.json, is taken as it is.)"""
    if not ws.data_source.is_file():
        return
    ingested = SourceSummary.read(ws.data_source, "ingest").source
    if ingested != p.source:
        raise DataError(
            f"params.yaml has data.source: {p.source}, but data/ holds {ingested}:"
            " run `visionops ingest` to bring the new source in (or `visionops run`), then `dvc repro`"
        )


def prepare(p: DataParams, ws: Workspace) -> PrepareReport:
    """data/{train,test}.parquet -> prepared/: tensors, labels, classes.json, manifest, report."""
    check_ingested(p, ws)
    columns = {split: read_labels(ws.raw_split(split)) for split in SPLITS}
    classes = sorted({name for _paths, names in columns.values() for name in names})
    label_of = {name: i for i, name in enumerate(classes)}
    staging = Path(tempfile.mkdtemp(dir=ws.root, prefix=".prepared-"))
    staging.chmod(0o755)
    manifest: dict[str, list[Any]] = {name: [] for name in MANIFEST_SCHEMA.names}
    counts: dict[str, SplitCounts] = {}
    corrupt: list[CorruptFile] = []
    shapes: dict[str, list[int]] = {}
    start = time.perf_counter()
    total = 0
    try:
        for split, (paths, names) in columns.items():
            chunks = _decode_split(ws.raw_split(split), p.image_size, p.channels, split)
            empty = np.empty((0, p.channels, p.image_size, p.image_size), np.uint8)
            pixels = np.concatenate([c.pixels for c in chunks]) if chunks else empty
            ok = [v for c in chunks for v in c.ok]
            labels = np.array([label_of[n] for n, good in zip(names, ok, strict=True) if good], dtype=np.int64)
            _save_npy(staging / ws.images(split).name, pixels)
            _save_npy(staging / ws.labels(split).name, labels)
            shapes[split] = list(pixels.shape)
            index = np.cumsum(ok) - 1
            manifest["split"] += [split] * len(paths)
            manifest["index"] += [int(i) if good else -1 for i, good in zip(index.tolist(), ok, strict=True)]
            manifest["label"] += [label_of[n] for n in names]
            manifest["class_name"] += names
            manifest["path"] += paths
            manifest["decoded"] += ok
            for column in ("content_hash", "height", "width", "channels", "mean", "std", "error"):
                manifest[column] += [v for c in chunks for v in getattr(c, column)]
            errors = [v for c in chunks for v in c.error]
            bad = [CorruptFile(split, path, err) for path, err in zip(paths, errors, strict=True) if err is not None]
            corrupt += bad
            counts[split] = SplitCounts(images=len(paths), decoded=int(sum(ok)), corrupt=len(bad))
            total += len(paths)
        seconds = time.perf_counter() - start
        rate = total / max(seconds, 1e-9)
        pq.write_table(pa.table(manifest, schema=MANIFEST_SCHEMA), staging / ws.manifest.name)
        (staging / ws.classes.name).write_text(json.dumps(classes) + "\n")
        report = PrepareReport(
            image_size=p.image_size,
            channels=p.channels,
            dtype="uint8",
            classes=classes,
            counts=counts,
            shapes=shapes,
            corrupt_count=len(corrupt),
            corrupt=corrupt[:MAX_REPORTED_CORRUPT],
            seconds=round(seconds, 3),
            images_per_s=round(rate, 1),
        )
        report.write(staging / ws.prepare_report.name)
        if ws.prepared.exists():
            shutil.rmtree(ws.prepared)
        os.replace(staging, ws.prepared)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    for item in corrupt[:10]:
        log.warning("undecodable %s image %s: %s", item.split, item.path, item.error)
    log.info("prepared %d images in %.1f s (%.0f images/s); %d undecodable", total, seconds, rate, len(corrupt))
    return report


def main() -> None:
    prepare(params.load().data, Workspace.here())


if __name__ == "__main__":
    run_stage(main)
