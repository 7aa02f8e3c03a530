"""The registry's storage: files under its root, on a local disk or any fsspec URL (object stores)."""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

from tasks.fs.atomic import atomic_write_bytes


class Store:
    """Files under the registry root, on a local disk or through fsspec."""

    def __init__(self, uri: str) -> None:
        import fsspec

        self.uri = uri
        self.fs, self.root = fsspec.core.url_to_fs(uri)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def url(self, path: str) -> str:
        return path if self.local else self.fs.unstrip_protocol(path)

    def exists(self, path: str) -> bool:
        return bool(self.fs.exists(path))

    def read_bytes(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    def write_atomic(self, path: str, data: bytes) -> None:
        if self.local:
            atomic_write_bytes(Path(path), data)
            Path(path).chmod(0o644)
        else:
            self.fs.pipe_file(path, data)  # one object PUT: readers see the old object or the new one

    def append_line(self, path: str, line: str) -> None:
        """Append one JSON line; the caller holds the lock, so appends never interleave."""
        data = (line.rstrip("\n") + "\n").encode()
        if self.local:
            with open(path, "a+b") as fh:
                fh.seek(0, os.SEEK_END)
                if fh.tell() > 0:
                    fh.seek(-1, os.SEEK_END)
                    if fh.read(1) != b"\n":
                        data = b"\n" + data  # end a line torn by a killed process; never glue onto it
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        else:
            old = self.read_bytes(path) if self.exists(path) else b""
            if old and not old.endswith(b"\n"):
                old += b"\n"
            self.fs.pipe_file(path, old + data)

    def numeric_dirs(self, path: str) -> list[int]:
        if not self.exists(path):
            return []
        names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(path, detail=False)]
        return sorted(int(n) for n in names if n.isdigit() and not n.startswith("0"))

    def fetch(self, path: str, dest: Path) -> Path:
        """A local file for ``path``: itself on a local disk, a cached download otherwise."""
        if self.local:
            return Path(path)
        if not dest.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(dest, self.read_bytes(path))
        return dest


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
