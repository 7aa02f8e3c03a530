"""ingest: a new version of data/ from a source, versioned with DVC (not a dvc.yaml stage).

data/ is built complete in a temporary folder next to it and swapped in only then; if anything
fails (the source, ``dvc add``, ``dvc push``) the previous data/ and data.dvc stay in place.
Identical content gives identical bytes, so re-ingesting leaves data.dvc unchanged.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tasks import params
from tasks.data import downloads, sources, versioning
from tasks.data.raw import RawDataset, write_split
from tasks.data.reports import SourceSummary
from tasks.entry import run_stage
from tasks.errors import DataError
from tasks.params import DataParams
from tasks.paths import SPLITS, Workspace

log = logging.getLogger(__name__)

STAGING_PREFIX = ".data.ingest-"  # temporary folders next to data/, removed on success or failure


@dataclass(frozen=True)
class IngestResult:
    source: str
    data: Path
    dvc_file: Path
    md5: str | None  # of data/ as DVC records it
    changed: bool  # False when the content was identical to the previous version
    counts: dict[str, dict[str, int]]
    content_sha256: str


def content_sha256(dataset: RawDataset) -> str:
    """A hash of every (split, path, class, image bytes): the same content, the same hash."""
    digest = hashlib.sha256()
    for split in SPLITS:
        for img in dataset.splits[split]:
            digest.update(f"{split}\0{img.path}\0{img.class_name}\0".encode())
            digest.update(hashlib.sha256(img.image).digest())
    return digest.hexdigest()


def _write_data(dataset: RawDataset, folder: Path, checksum: str) -> None:
    for split in SPLITS:
        write_split(dataset.splits[split], folder / f"{split}.parquet")
    summary = SourceSummary(
        source=dataset.source,
        checksum={"content_sha256": checksum},
        counts=dataset.counts(),
        classes=dataset.class_names(),
        details=dataset.details,
    )
    (folder / "source.json").write_text(json.dumps(summary.to_json(), indent=2, sort_keys=True) + "\n")


def _same_files(a: Path, b: Path) -> bool:
    if not a.is_dir() or not b.is_dir():
        return False
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    return all((a / n).is_file() and (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def _check(dataset: RawDataset) -> None:
    for split in SPLITS:
        if not dataset.splits[split]:
            raise DataError(f"source {dataset.source}: the {split} split has no images")


def _restore(data: Path, previous: Path | None, swapped: bool, dvc_file: Path, previous_dvc: bytes | None) -> None:
    """Put back the data/ and data.dvc that were there before a failed ingest."""
    if swapped and data.exists():
        shutil.rmtree(data)
    if previous is not None and (previous / "data").exists():
        os.replace(previous / "data", data)
    if previous_dvc is None:
        dvc_file.unlink(missing_ok=True)
    else:
        dvc_file.write_bytes(previous_dvc)


def ingest(p: DataParams, ws: Workspace, source: str | None = None) -> IngestResult:
    """Bring ``source`` (default ``data.source``) into data/, ``dvc add`` it and ``dvc push`` it."""
    source = source or p.source
    for stale in ws.root.glob(STAGING_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by an ingest that was killed
    log.info("ingesting %s", source)
    dataset = sources.load(source, p, downloads.cache_dir())
    _check(dataset)
    checksum = content_sha256(dataset)
    dvc_file = ws.data.with_name(ws.data.name + ".dvc")
    staging = Path(tempfile.mkdtemp(dir=ws.root, prefix=STAGING_PREFIX))
    staging.chmod(0o755)  # mkdtemp makes it private; data/ should read like any folder
    previous: Path | None = None
    swapped = False
    previous_dvc = dvc_file.read_bytes() if dvc_file.is_file() else None
    try:
        _write_data(dataset, staging, checksum)
        changed = not _same_files(staging, ws.data)
        if changed:
            if ws.data.exists():
                previous = Path(tempfile.mkdtemp(dir=ws.root, prefix=STAGING_PREFIX))
                os.replace(ws.data, previous / "data")
            os.replace(staging, ws.data)
            swapped = True
        versioning.add(ws, ws.data)
        versioning.push(ws, dvc_file)
    except BaseException:
        _restore(ws.data, previous, swapped, dvc_file, previous_dvc)
        log.error("ingest of %s failed; the previous data/ and data.dvc are back in place", source)
        raise
    finally:
        for folder in (staging, previous):
            if folder is not None and folder.exists():
                shutil.rmtree(folder, ignore_errors=True)
    counts = dataset.counts()
    log.info(
        "data/ %s: %d train, %d test images in %d classes (md5 %s)",
        "updated" if changed else "unchanged",
        sum(counts["train"].values()),
        sum(counts["test"].values()),
        len(dataset.class_names()),
        versioning.tracked_md5(dvc_file),
    )
    return IngestResult(source, ws.data, dvc_file, versioning.tracked_md5(dvc_file), changed, counts, checksum)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tasks.ingest", description=__doc__)
    parser.add_argument("--source", help="synthetic | cifar10 | class-folder dir, .tar or .zip (path or URL)")
    args = parser.parse_args(argv)
    ingest(params.load().data, Workspace.here(), args.source)


if __name__ == "__main__":
    run_stage(main)
