"""Atomic writes and renames: a reader sees the old file or folder or the new one, never half of either.

A rename is durable only once the folder that holds it is fsynced, so every rename here is followed
by an fsync of the folder(s) it changed. Work folders (``Staging``) are built next to their
destination and renamed into place; each is owned through an ``flock``, so the next run can tell a
folder whose owner was killed (removed by :func:`sweep`) from one that is still being written.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

LOCK_SUFFIX = ".lock"  # next to a work folder (never inside it: the folder is renamed into place whole)
TRASH_PREFIX = "trash-"  # a folder renamed here is already gone for readers; deleting it may take a while


def _umask() -> int:
    """The process umask, read without setting it (os.umask would change it for other threads)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def fsync_dir(folder: Path) -> None:
    """Make the entries of ``folder`` (a rename, a link, a removal inside it) durable, not just the files."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_replace(src: Path, dst: Path) -> None:
    """``os.replace(src, dst)``, then fsync the folder(s) involved so that the rename survives a crash."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)
    if Path(src).parent != Path(dst).parent:
        fsync_dir(Path(src).parent)


def _durable_temp(path: Path, data: bytes) -> str:
    """A temporary file next to ``path`` holding ``data``, flushed to disk; its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it private; the file should read like any other
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path`` (durably)."""
    path = Path(path)
    tmp = _durable_temp(path, data)
    try:
        durable_replace(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def create_exclusive_bytes(path: Path, data: bytes) -> None:
    """Create ``path`` holding ``data`` only if it does not exist yet (``FileExistsError`` if it does).

    The bytes go to a temporary file first and are hard-linked into place: a reader never sees a
    partial file, and of two writers racing for the same name exactly one wins (link is atomic).
    """
    path = Path(path)
    tmp = _durable_temp(path, data)
    try:
        os.chmod(tmp, 0o644)
        os.link(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    fsync_dir(path.parent)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder below ``folder`` (before it is renamed into place)."""
    for current, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(current, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(current))


def discard(folder: Path) -> None:
    """Remove ``folder``: renamed to a trash name first (atomic), then deleted, so a kill midway
    never leaves a half-deleted folder under a name that means something."""
    if not folder.exists():
        return
    trash = Path(tempfile.mkdtemp(dir=folder.parent, prefix=TRASH_PREFIX))
    durable_replace(folder, trash / folder.name)
    shutil.rmtree(trash, ignore_errors=True)


def _try_lock(lock: Path) -> int | None:
    """An fd holding an exclusive flock on ``lock``, or None if a live process holds it."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def orphans(parent: Path, prefix: str) -> Iterator[Path]:
    """The work folders ``parent/<prefix>*`` whose owner is gone (killed, crashed), each held (its
    lock taken) while the caller looks at it, then removed. Folders of live owners are skipped."""
    if not parent.is_dir():
        return
    for folder in sorted(parent.glob(prefix + "*")):
        if not folder.is_dir() or folder.is_symlink():
            continue
        lock = folder.with_name(folder.name + LOCK_SUFFIX)
        fd = _try_lock(lock)
        if fd is None:
            continue
        try:
            yield folder
            shutil.rmtree(folder, ignore_errors=True)
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)


def sweep(parent: Path, prefix: str) -> list[Path]:
    """Remove the work folders ``parent/<prefix>*`` whose owner is gone, and any trash; those removed."""
    removed = list(orphans(parent, prefix))
    if parent.is_dir():
        for trash in parent.glob(TRASH_PREFIX + "*"):
            shutil.rmtree(trash, ignore_errors=True)  # a kill during discard(): nothing refers to it
        for lock in parent.glob(prefix + "*" + LOCK_SUFFIX):  # a kill between removing a folder and its lock
            fd = _try_lock(lock)
            if fd is not None:
                if not lock.with_name(lock.name.removesuffix(LOCK_SUFFIX)).exists():
                    lock.unlink(missing_ok=True)
                os.close(fd)
    return removed


class Staging:
    """A work folder ``parent/<prefix><random>`` owned (flock) by this process while in use.

    On leaving the ``with`` block the folder is removed unless it was renamed away (put in place);
    if the process is killed instead, the next :func:`sweep` of the same prefix removes it.
    """

    def __init__(self, parent: Path, prefix: str) -> None:
        parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
        self.path.chmod(0o755)  # mkdtemp makes it private; what is renamed into place should read like any folder
        self._lock = self.path.with_name(self.path.name + LOCK_SUFFIX)
        fd = _try_lock(self._lock)
        assert fd is not None, "a fresh lock file cannot be held by anyone else"
        self._fd = fd

    def __enter__(self) -> Staging:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._fd < 0:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        self._lock.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = -1
