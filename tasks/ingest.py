"""ingest: a new version of data/ from a source, versioned with DVC (not a dvc.yaml stage).

The source is streamed image by image into Parquet shards in a work folder (memory does not grow
with the dataset); its content hash is computed on the way. Only a complete, checked folder is
swapped in (tasks/data/swap.py), then ``dvc add`` and ``dvc push`` run and are verified file by
file. If anything fails, data/ and data.dvc are put back as they were; a killed ingest is undone by
the next one. Identical content gives identical bytes, so re-ingesting leaves data.dvc unchanged.
A new version stays *pending* until the validate stage has passed on it (see swap.py).
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from tasks import params
from tasks.data import downloads, sources, swap, versioning
from tasks.data.raw import RawDataset, ShardLimits, ShardWriter, check_classes
from tasks.data.reports import SourceSummary
from tasks.entry import run_stage
from tasks.errors import DataError, storage_error
from tasks.fs.atomic import Staging, fsync_tree, sweep
from tasks.fs.progress import track
from tasks.params import DataParams, IngestParams
from tasks.paths import SPLITS, Workspace

log = logging.getLogger(__name__)

STAGING_PREFIX = "ingest-"  # work folders under .visionops/staging/, removed on success, failure or the next run


@dataclass(frozen=True)
class WrittenData:
    """What was written into a data/ folder."""

    counts: dict[str, dict[str, int]]  # split -> class -> images
    content_sha256: str
    shards: dict[str, list[str]]  # split -> shard file names
    bytes: int  # encoded image bytes


@dataclass(frozen=True)
class IngestResult:
    source: str
    data: Path
    dvc_file: Path
    md5: str | None  # of data/ as DVC records it
    changed: bool  # False when the content was identical to the previous version
    counts: dict[str, dict[str, int]]
    content_sha256: str


class _ContentHash:
    """sha256 over every image's (split, path, class, sha256 of its bytes), in a fixed order: the same
    content gives the same hash whatever order a source streams it in (a tar is read in archive
    order). Holds 32 bytes per image, not the images."""

    def __init__(self) -> None:
        self.entries: list[tuple[int, str, str, bytes]] = []

    def add(self, split: str, path: str, class_name: str, image: bytes) -> None:
        self.entries.append((SPLITS.index(split), class_name, path, hashlib.sha256(image).digest()))

    def hexdigest(self) -> str:
        digest = hashlib.sha256()
        for split, class_name, path, image in sorted(self.entries):
            digest.update(f"{SPLITS[split]}\0{path}\0{class_name}\0".encode())
            digest.update(image)
        return digest.hexdigest()


def write_data(dataset: RawDataset, folder: Path, bounds: IngestParams) -> WrittenData:
    """Stream ``dataset`` into ``folder`` (shards per split, source.json); checked, not yet durable."""
    limits = ShardLimits(bounds.shard_bytes, bounds.row_group_bytes)
    writers = {split: ShardWriter(folder, split, limits) for split in SPLITS}
    counts: dict[str, dict[str, int]] = {split: {} for split in SPLITS}
    content = _ContentHash()
    total = 0
    for split, image in track(dataset.images(), dataset.total, f"ingest {dataset.source}", log):
        size = len(image.image)
        if size > bounds.max_image_bytes:
            raise DataError(f"{dataset.source}: {image.path} is {size / 1e6:,.1f} MB, above data.ingest.max_image_mb")
        total += size
        if total > bounds.max_dataset_bytes:
            raise DataError(f"{dataset.source}: more than data.ingest.max_dataset_gb of images (at {image.path})")
        writers[split].add(image)
        content.add(split, image.path, image.class_name, image.image)
        counts[split][image.class_name] = counts[split].get(image.class_name, 0) + 1
    shards = {split: [p.name for p in writers[split].close()] for split in SPLITS}
    counts = {split: dict(sorted(per_class.items())) for split, per_class in counts.items()}
    for split in SPLITS:
        if not counts[split]:
            raise DataError(f"source {dataset.source}: the {split} split has no images")
    classes = sorted({name for per_class in counts.values() for name in per_class})
    check_classes(classes, dataset.source)
    checksum = content.hexdigest()
    summary = SourceSummary(
        source=dataset.source, checksum={"content_sha256": checksum}, counts=counts, classes=classes,
        details=dataset.details,
    )
    summary.write(folder / "source.json")
    return WrittenData(counts, checksum, shards, total)


def _same_files(a: Path, b: Path) -> bool:
    if not a.is_dir() or not b.is_dir():
        return False
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    return all((b / n).is_file() and filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def _version(ws: Workspace, staging: Path, changed: bool, content: str) -> str | None:
    """Swap ``staging`` in (when ``changed``), ``dvc add`` and ``dvc push`` it, verify both; the md5.

    Anything failing puts data/ and data.dvc back as they were and re-raises."""
    dvc_file = ws.data_dvc
    data_swap = swap.DataSwap(ws)
    try:
        if changed:
            fsync_tree(staging)  # every shard on disk before the rename makes it data/
            data_swap.put_in_place(staging)
        versioning.add(ws, ws.data)
        versioning.verify(ws, dvc_file, "cache")
        versioning.push(ws, dvc_file)
        versioning.verify(ws, dvc_file, "remote")
    except BaseException:
        versioning.drop_truncated(ws, dvc_file)  # what a `dvc add` on a full disk leaves under final names
        data_swap.rollback()
        log.error("ingest failed; the previous data/ and data.dvc are back in place")
        raise
    data_swap.commit(pending_content=content if changed else None)
    return versioning.tracked_md5(dvc_file)


def ingest(p: DataParams, ws: Workspace, source: str | None = None) -> IngestResult:
    """Bring ``source`` (default ``data.source``) into data/, ``dvc add`` it and ``dvc push`` it."""
    source = source or p.source
    if not (ws.root / ".dvc").is_dir():
        raise DataError(f"{ws.root} is not a DVC repository: run `git init && dvc init` there first")
    staging_root = ws.staging
    try:
        swap.recover(ws)
        sweep(staging_root, STAGING_PREFIX)  # left by an ingest that was killed
        log.info("ingesting %s", source)
        dataset = sources.load(source, p, downloads.cache_dir())
        with Staging(staging_root, STAGING_PREFIX) as staging:
            written = write_data(dataset, staging.path, p.ingest)
            changed = not _same_files(staging.path, ws.data)
            md5 = _version(ws, staging.path, changed, written.content_sha256)
    except OSError as exc:
        raise storage_error(exc, staging_root) from exc
    n_train, n_test = (sum(written.counts[split].values()) for split in SPLITS)
    log.info(
        "data/ %s: %d train, %d test images in %d classes, %.0f MB in %d shards (md5 %s)",
        "updated" if changed else "unchanged",
        n_train,
        n_test,
        len({name for per_class in written.counts.values() for name in per_class}),
        written.bytes / 1e6,
        sum(len(v) for v in written.shards.values()),
        md5,
    )
    return IngestResult(source, ws.data, ws.data_dvc, md5, changed, written.counts, written.content_sha256)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tasks.ingest", description=__doc__)
    parser.add_argument("--source", help="synthetic | cifar10 | class-folder dir, .tar or .zip (path or URL)")
    args = parser.parse_args(argv)
    ingest(params.load().data, Workspace.here(), args.source)


if __name__ == "__main__":
    run_stage(main)
