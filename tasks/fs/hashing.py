"""Content hashes of files, read in bounded chunks: what the registry, the reports and resume keys record."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

CHUNK = 1 << 20  # bytes read per hashing step


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of one file's bytes."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def files_digest(paths: Iterable[Path]) -> str:
    """sha256 over the names and bytes of ``paths``, in the order given."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).name.encode() + b"\0")
        with open(path, "rb") as fh:
            while block := fh.read(CHUNK):
                digest.update(block)
    return digest.hexdigest()
