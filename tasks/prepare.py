"""prepare: decode data/ once into uint8 arrays per split, plus a manifest with one row per image.

Every core decodes: a process pool works through data/'s Parquet row groups, each worker reading
its own group and writing its pixels straight into ``{split}_images.npy`` at the group's rows (the
file is made with ``numpy.lib.format.open_memmap``; readers open it with ``mmap_mode="r"``). No
process holds a split, so memory does not grow with the dataset. The manifest is written as the
groups come in, in order. Undecodable files never stop the stage: they get a manifest row
(``decoded`` false, ``error``) and are listed by path in prepare_report.json, for validate to fail
on with their names.

What is learnt about each image is :class:`ImageFacts`, computed by :func:`inspect_image`: a new
manifest column is a field there plus its entry in ``MANIFEST_SCHEMA``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks import params
from tasks.data.imaging import convert, decode
from tasks.data.phash import dct_hashes, to_hex
from tasks.data.raw import RowGroup, class_names, damaged, parquet_file, read_group, row_groups
from tasks.data.reports import CorruptFile, PrepareReport, SourceSummary, SplitCounts
from tasks.entry import StageSpec, run_stage
from tasks.errors import DataError, storage_error
from tasks.fs.atomic import Staging, discard, durable_replace, fsync_tree, sweep
from tasks.fs.progress import track
from tasks.params import DataParams
from tasks.paths import SPLITS, Workspace

log = logging.getLogger(__name__)

POOL_MIN = 2048  # images in data/ before a process pool (1-2 s to start) pays for itself
DECODE_BATCH = 64  # images a worker decodes before writing them out in one write
COPY_BLOCK_BYTES = 64 << 20  # bytes of pixels moved at a time when dropping undecodable rows
MAX_REPORTED_CORRUPT = 1000  # corrupt files listed in prepare_report.json; the rest only counted
STAGING_PREFIX = "prepare-"  # work folders under .visionops/staging/

MANIFEST_SCHEMA = pa.schema(
    [
        ("split", pa.string()),
        ("index", pa.int64()),  # row in {split}_images.npy; -1 when not decoded
        ("label", pa.int64()),
        ("class_name", pa.string()),
        ("content_hash", pa.string()),  # blake2b-128 of the converted pixels; null when not decoded
        ("path", pa.string()),
        ("height", pa.int64()),  # of the original image, upright
        ("width", pa.int64()),
        ("channels", pa.int64()),
        ("mean", pa.float64()),  # of the converted pixels, 0..1
        ("std", pa.float64()),
        ("phash", pa.string()),  # 64-bit perceptual hash of the converted pixels, 16 hex digits (tasks/data/phash.py)
        ("decoded", pa.bool_()),
        ("error", pa.string()),
    ]
)


@dataclass(frozen=True)
class ImageFacts:
    """The manifest columns prepare learns from one image's bytes (None where it did not decode)."""

    decoded: bool
    content_hash: str | None
    height: int | None
    width: int | None
    channels: int | None
    error: str | None


FACTS = [f.name for f in fields(ImageFacts)]
STATS_BLOCK_BYTES = 8 << 20  # float32 pixels converted at a time for the per-image mean and std


def inspect_image(encoded: bytes, image_size: int, channels: int) -> tuple[np.ndarray | None, ImageFacts]:
    """The converted (C, H, W) uint8 pixels of one encoded image and its facts; failures are facts."""
    try:
        img = decode(encoded)
        (width, height), bands = img.size, len(img.getbands())
        pixels = convert(img, image_size, channels)
    except DataError as exc:
        return None, ImageFacts(False, None, None, None, None, str(exc))
    digest = hashlib.blake2b(pixels.tobytes(), digest_size=16).hexdigest()
    return pixels, ImageFacts(True, digest, height, width, bands, None)


def pixel_stats(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (0..1 scale) of each image of a uint8 (N, C, H, W) block, a few MB at a time."""
    flat = block.reshape(len(block), -1)
    step = max(1, STATS_BLOCK_BYTES // (4 * max(1, flat.shape[1])))
    means, stds = np.empty(len(flat)), np.empty(len(flat))
    for i in range(0, len(flat), step):
        scaled = flat[i : i + step].astype(np.float32) / 255.0
        means[i : i + step], stds[i : i + step] = scaled.mean(axis=1), scaled.std(axis=1)
    return means, stds


@dataclass(frozen=True)
class DecodedGroup:
    """One row group's manifest columns (path, class_name, mean, std and every ImageFacts field)."""

    columns: dict[str, list[Any]]

    @property
    def rows(self) -> int:
        return len(self.columns["path"])


def decode_group(unit: RowGroup, images: Path, offset: int, image_size: int, channels: int) -> DecodedGroup:
    """Decode one row group into rows ``unit.start``... of ``images`` (an .npy whose data begins at
    ``offset``). Runs in a worker: it reads its own group, so no image bytes cross processes."""
    labels = read_group(unit, ["path", "class_name"])
    row_bytes = channels * image_size * image_size
    facts: list[ImageFacts] = []
    means: list[float | None] = []
    stds: list[float | None] = []
    phashes: list[str | None] = []
    try:
        batches = parquet_file(unit.path).iter_batches(DECODE_BATCH, row_groups=[unit.group], columns=["image"])
        with open(images, "r+b") as out:
            for batch in batches:
                block = np.zeros((batch.num_rows, channels, image_size, image_size), np.uint8)
                first = len(facts)
                for i, encoded in enumerate(batch.column(0).to_pylist()):
                    pixels, image_facts = inspect_image(encoded, image_size, channels)
                    if pixels is not None:
                        block[i] = pixels
                    facts.append(image_facts)
                mean, std = pixel_stats(block)
                ok = [f.decoded for f in facts[first:]]
                means += [float(m) if good else None for m, good in zip(mean, ok, strict=True)]
                stds += [float(v) if good else None for v, good in zip(std, ok, strict=True)]
                phashes += [h if good else None for h, good in zip(to_hex(dct_hashes(block)), ok, strict=True)]
                position = offset + (unit.start + first) * row_bytes
                if os.pwrite(out.fileno(), block.data, position) != block.nbytes:
                    raise OSError(errno.ENOSPC, "No space left on device (short write)", str(images))
    except pa.ArrowException as exc:
        raise damaged(unit.path, exc, f" row group {unit.group}") from exc
    except OSError as exc:
        raise storage_error(exc, images) from exc
    columns: dict[str, list[Any]] = {
        "path": labels.column("path").to_pylist(),
        "class_name": labels.column("class_name").to_pylist(),
        "mean": means,
        "std": stds,
        "phash": phashes,
    }
    columns.update({name: [getattr(f, name) for f in facts] for name in FACTS})
    return DecodedGroup(columns)


def _decoded(
    units: list[RowGroup], pool: ProcessPoolExecutor | None, images: Path, offset: int, p: DataParams
) -> Iterator[DecodedGroup]:
    """Every row group of ``units`` decoded, in order, by ``pool`` or here."""
    n = len(units)
    args = (units, [images] * n, [offset] * n, [p.image_size] * n, [p.channels] * n)
    yield from pool.map(decode_group, *args) if pool is not None else map(decode_group, *args)


def _keep_decoded(full: Path, final: Path, ok: np.ndarray) -> None:
    """``final`` = the rows of ``full`` that decoded, a block at a time; ``full`` removed."""
    source = np.load(full, mmap_mode="r")
    kept = np.flatnonzero(ok)
    target = np.lib.format.open_memmap(final, mode="w+", dtype=np.uint8, shape=(len(kept), *source.shape[1:]))
    block = max(1, COPY_BLOCK_BYTES // max(1, int(np.prod(source.shape[1:]))))
    for i in range(0, len(kept), block):
        target[i : i + block] = source[kept[i : i + block]]
    target.flush()
    del source, target
    full.unlink()


@dataclass(frozen=True)
class _SplitResult:
    counts: SplitCounts
    shape: list[int]
    corrupt: list[CorruptFile]


def _prepare_split(
    split: str, p: DataParams, ws: Workspace, out: Path, pool: ProcessPoolExecutor | None,
    label_of: dict[str, int], manifest: pq.ParquetWriter,
) -> _SplitResult:
    units = row_groups(ws.data, split)
    total = sum(unit.rows for unit in units)
    full = out / f".{split}_images.all.npy"
    array = np.lib.format.open_memmap(
        full, mode="w+", dtype=np.uint8, shape=(total, p.channels, p.image_size, p.image_size)
    )
    offset = int(array.offset)
    del array  # workers write the rows; the parent never maps the split
    ok: list[bool] = []
    labels: list[int] = []
    corrupt: list[CorruptFile] = []
    decoded = _decoded(units, pool, full, offset, p)
    for group in track(decoded, len(units), f"prepare {split}: row groups decoded", log):
        columns = group.columns
        unknown = set(columns["class_name"]) - set(label_of)
        if unknown:
            raise DataError(f"{ws.data}: classes {sorted(unknown)} are not in data/'s class list: re-ingest")
        group_labels = [label_of[name] for name in columns["class_name"]]
        index = np.cumsum(columns["decoded"]) - 1 + len(labels)
        columns["index"] = [int(i) if good else -1 for i, good in zip(index, columns["decoded"], strict=True)]
        columns["label"], columns["split"] = group_labels, [split] * group.rows
        manifest.write_table(pa.table(columns, schema=MANIFEST_SCHEMA))
        ok += columns["decoded"]
        labels += [label for label, good in zip(group_labels, columns["decoded"], strict=True) if good]
        for path, error in zip(columns["path"], columns["error"], strict=True):
            if error is not None and len(corrupt) < MAX_REPORTED_CORRUPT:
                corrupt.append(CorruptFile(split, path, error))
    final = out / ws.images(split).name
    if all(ok):
        os.replace(full, final)
    else:
        _keep_decoded(full, final, np.array(ok, dtype=bool))
    np.save(out / ws.labels(split).name, np.array(labels, dtype=np.int64), allow_pickle=False)
    shape = [len(labels), p.channels, p.image_size, p.image_size]
    return _SplitResult(SplitCounts(images=total, decoded=len(labels), corrupt=total - len(labels)), shape, corrupt)


def _pool(ws: Workspace) -> ProcessPoolExecutor | None:
    """A pool of one worker per usable core, or None (decode here) when data/ is too small to pay for it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    images = sum(unit.rows for split in SPLITS for unit in row_groups(ws.data, split))
    if cores < 2 or images < POOL_MIN:
        return None
    # spawn: a forked child would inherit the parent's Arrow thread pools mid-flight.
    return ProcessPoolExecutor(max_workers=cores, mp_context=multiprocessing.get_context("spawn"))


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
    """data/ -> prepared/: arrays, labels, classes.json, manifest, report."""
    staging_root = ws.staging
    classes = class_names(ws.data)
    label_of = {name: i for i, name in enumerate(classes)}
    source = SourceSummary.read(ws.data_source, "ingest")
    start = time.perf_counter()
    try:
        sweep(staging_root, STAGING_PREFIX)  # left by a prepare that was killed
        with Staging(staging_root, STAGING_PREFIX) as staging:
            out = staging.path
            results: dict[str, _SplitResult] = {}
            pool = _pool(ws)
            try:
                with pq.ParquetWriter(out / ws.manifest.name, MANIFEST_SCHEMA) as manifest:
                    for split in SPLITS:
                        results[split] = _prepare_split(split, p, ws, out, pool, label_of, manifest)
            finally:
                if pool is not None:
                    pool.shutdown(cancel_futures=True)
            seconds = time.perf_counter() - start
            total = sum(r.counts.images for r in results.values())
            (out / ws.classes.name).write_text(json.dumps(classes) + "\n")
            corrupt = [c for r in results.values() for c in r.corrupt]
            report = PrepareReport(
                image_size=p.image_size,
                channels=p.channels,
                dtype="uint8",
                classes=classes,
                counts={split: r.counts for split, r in results.items()},
                shapes={split: r.shape for split, r in results.items()},
                corrupt_count=sum(r.counts.corrupt for r in results.values()),
                corrupt=corrupt[:MAX_REPORTED_CORRUPT],
                seconds=round(seconds, 3),
                images_per_s=round(total / max(seconds, 1e-9), 1),
                data_content_sha256=source.checksum.get("content_sha256", ""),
            )
            report.write(out / ws.prepare_report.name)
            fsync_tree(out)
            discard(ws.prepared)
            durable_replace(out, ws.prepared)
    except OSError as exc:
        raise storage_error(exc, staging_root) from exc
    for item in corrupt[:10]:
        log.warning("undecodable %s image %s: %s", item.split, item.path, item.error)
    log.info(
        "prepared %d images in %.1f s (%.0f images/s); %d undecodable",
        total, seconds, report.images_per_s, report.corrupt_count,
    )
    return report


def main() -> None:
    p, ws = params.load().data, Workspace.here()
    check_ingested(p, ws)  # the stage's check (dvc repro); prepare() itself prepares whatever data/ holds
    prepare(p, ws)


if __name__ == "__main__":
    run_stage(main)
