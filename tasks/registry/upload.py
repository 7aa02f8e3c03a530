"""Writing one version's files into the registry, then checking each one's sha256 where it landed.

On a local disk the files are assembled in a staging folder and renamed into place (the folder
appears whole). S3 has no rename: each object is created only if absent, under the version's
final prefix. Either way nothing points at the version until its promote event and config.pbtxt
are written, so a version whose upload was cut short is never production.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

from tasks.errors import RegistryError
from tasks.fs.atomic import fsync_dir
from tasks.fs.hashing import file_digest
from tasks.registry.layout import CARD, STAGING_PREFIX
from tasks.registry.store import Conflict, Store
from tasks.registry.triton import labels_file


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_version(
    store: Store, folder: str, version: int, files: Mapping[str, Path], card: bytes, labels: bytes
) -> dict[str, str]:
    """Write ``files``, the card and the labels of ``version`` into the model folder ``folder``; each
    file (relative to ``folder``) -> sha256, every one checked where it landed."""
    expected = {f"{version}/{name}": file_digest(src) for name, src in files.items()}
    expected[f"{version}/{CARD}"] = sha256(card)
    expected[labels_file(version)] = sha256(labels)
    try:
        if store.local:
            _assemble_locally(folder, version, files, card)
        else:
            for name, src in files.items():
                store.upload_new(src, f"{folder}/{version}/{name}")
            store.create(f"{folder}/{version}/{CARD}", card)
        store.create(f"{folder}/{labels_file(version)}", labels)
    except Conflict as exc:
        raise RegistryError(
            f"version {version} of {store.url(folder)} is being written by another process ({exc}): this"
            " one's lease expired or was taken over; retry"
        ) from None
    for name, digest in expected.items():
        path = f"{folder}/{name}"
        actual = file_digest(Path(path)) if store.local else sha256(store.read_tagged(path)[0])
        if actual != digest:
            raise RegistryError(
                f"{store.url(path)} did not arrive intact (sha256 {actual[:12]}... instead of {digest[:12]}...);"
                f" version {version} was not activated and the next promotion removes it"
            )
    return expected


def _assemble_locally(folder: str, version: int, files: Mapping[str, Path], card: bytes) -> None:
    staging = Path(folder) / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    try:
        for name, src in files.items():
            shutil.copyfile(src, staging / name)
        (staging / CARD).write_bytes(card)
        for f in staging.iterdir():
            f.chmod(0o644)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        staging.chmod(0o755)
        fsync_dir(staging)
        try:
            os.rename(staging, Path(folder) / str(version))  # atomic: the folder appears whole
        except OSError as exc:  # the number exists already (ENOTEMPTY/EEXIST)
            raise Conflict(f"{Path(folder) / str(version)} exists") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    fsync_dir(Path(folder))
