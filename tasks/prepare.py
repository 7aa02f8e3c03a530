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

from tasks.errors import DataError
from tasks.imaging import convert, decode
from tasks.rawdata import read_split
from tasks.params import DataParams
from tasks.paths import SPLITS, Workspace

log = logging.getLogger(__name__)

CHUNK = 2048  # images per decoding task
POOL_MIN = 8192  # images in a split before a process pool pays for its start-up
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


@dataclass(frozen=True)
class PrepareResult:
    counts: dict[str, dict[str, int]]  # split -> {"images", "decoded", "corrupt"}
    corrupt: list[dict[str, str]]  # {"split", "path", "error"}
    images_per_s: float


def decode_chunk(encoded: list[bytes], image_size: int, channels: int) -> DecodedChunk:
    """Decode and convert a list of encoded images; failures are recorded, never raised."""
    arrays: list[np.ndarray] = []
    result = DecodedChunk(np.empty(0), [], [], [], [], [], [], [], [])
    for data in encoded:
        try:
            img = decode(data)
            size, bands = img.size, len(img.getbands())
            pixels = convert(img, image_size, channels)
        except DataError as exc:
            for column in (result.height, result.width, result.channels, result.content_hash, result.mean, result.std):
                column.append(None)
            result.ok.append(False)
            result.error.append(str(exc))
            continue
        arrays.append(pixels)
        result.ok.append(True)
        result.width.append(size[0])
        result.height.append(size[1])
        result.channels.append(bands)
        result.content_hash.append(hashlib.blake2b(pixels.tobytes(), digest_size=16).hexdigest())
        result.error.append(None)
    shape = (len(arrays), channels, image_size, image_size)
    stacked = np.stack(arrays) if arrays else np.empty(shape, np.uint8)
    flat = stacked.reshape(len(arrays), -1).astype(np.float32) / 255.0
    means, stds = iter(flat.mean(axis=1).tolist()), iter(flat.std(axis=1).tolist())
    for ok in result.ok:
        result.mean.append(float(next(means)) if ok else None)
        result.std.append(float(next(stds)) if ok else None)
    return DecodedChunk(stacked, *(getattr(result, f) for f in ("ok", "height", "width", "channels", "content_hash", "mean", "std", "error")))


def _decode_all(encoded: list[bytes], image_size: int, channels: int, split: str) -> list[DecodedChunk]:
    chunks = [encoded[i : i + CHUNK] for i in range(0, len(encoded), CHUNK)]
    workers = min(os.cpu_count() or 1, len(chunks))
    start, done, next_log = time.perf_counter(), 0, PROGRESS_EVERY
    results: list[DecodedChunk] = []

    def progress(chunk: DecodedChunk) -> None:
        nonlocal done, next_log
        results.append(chunk)
        done += len(chunk.ok)
        if done >= next_log or done == len(encoded):
            rate = done / max(time.perf_counter() - start, 1e-9)
            log.info("prepare %s: decoded %d/%d images (%.0f images/s)", split, done, len(encoded), rate)
            next_log += PROGRESS_EVERY

    if len(encoded) < POOL_MIN or workers < 2:
        for chunk in chunks:
            progress(decode_chunk(chunk, image_size, channels))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for chunk_result in pool.map(decode_chunk, chunks, [image_size] * len(chunks), [channels] * len(chunks)):
                progress(chunk_result)
    return results


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


def prepare(ws: Workspace, p: DataParams) -> PrepareResult:
    """data/{train,test}.parquet -> prepared/: tensors, labels, classes.json, manifest, report."""
    tables = {split: read_split(ws.raw_split(split)) for split in SPLITS}
    classes = sorted({name for t in tables.values() for name in t.column("class_name").to_pylist()})
    label_of = {name: i for i, name in enumerate(classes)}
    staging = Path(tempfile.mkdtemp(dir=ws.root, prefix=".prepared-"))
    staging.chmod(0o755)
    manifest: dict[str, list[Any]] = {name: [] for name in MANIFEST_SCHEMA.names}
    counts: dict[str, dict[str, int]] = {}
    corrupt: list[dict[str, str]] = []
    shapes: dict[str, list[int]] = {}
    start = time.perf_counter()
    total = 0
    try:
        for split, table in tables.items():
            paths = table.column("path").to_pylist()
            names = table.column("class_name").to_pylist()
            chunks = _decode_all(table.column("image").to_pylist(), p.image_size, p.channels, split)
            pixels = np.concatenate([c.pixels for c in chunks]) if chunks else np.empty((0, p.channels, p.image_size, p.image_size), np.uint8)
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
            bad = [{"split": split, "path": path, "error": err} for path, err in zip(paths, errors, strict=True) if err is not None]
            corrupt += bad
            counts[split] = {"images": len(paths), "decoded": int(sum(ok)), "corrupt": len(bad)}
            total += len(paths)
        seconds = time.perf_counter() - start
        rate = total / max(seconds, 1e-9)
        pq.write_table(pa.table(manifest, schema=MANIFEST_SCHEMA), staging / ws.manifest.name)
        (staging / ws.classes.name).write_text(json.dumps(classes) + "\n")
        report = {
            "image_size": p.image_size,
            "channels": p.channels,
            "dtype": "uint8",
            "classes": classes,
            "counts": counts,
            "shapes": shapes,
            "corrupt_count": len(corrupt),
            "corrupt": corrupt[:MAX_REPORTED_CORRUPT],
            "seconds": round(seconds, 3),
            "images_per_s": round(rate, 1),
        }
        (staging / ws.prepare_report.name).write_text(json.dumps(report, indent=2) + "\n")
        if ws.prepared.exists():
            shutil.rmtree(ws.prepared)
        os.replace(staging, ws.prepared)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    for item in corrupt[:10]:
        log.warning("undecodable %s image %s: %s", item["split"], item["path"], item["error"])
    log.info("prepared %d images in %.1f s (%.0f images/s); %d undecodable", total, seconds, rate, len(corrupt))
    return PrepareResult(counts, corrupt, rate)


def main() -> None:
    from tasks import params

    prepare(Workspace.here(), params.load().data)


if __name__ == "__main__":
    from tasks.entry import run_stage

    run_stage(main)
