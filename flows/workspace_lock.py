"""At most one pipeline run works in a workspace at a time: an exclusive file lock under .visionops/.

The lock is an ``flock`` on ``.visionops/pipeline.lock``: the kernel drops it when the last
process holding its file descriptor ends, so a killed run never leaves a stale lock behind. The
run's ``dvc repro`` inherits that descriptor (:func:`held_lock_fd`): if a run is killed mid-stage,
the workspace stays locked until the orphaned DVC has finished. The holder writes who it is into
the file, so a run that has to wait can say what it is waiting for.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from tasks.errors import VisionopsError
from tasks.fs.flock import LockTimeout, acquire_exclusive
from tasks.paths import Workspace

POLL_S = 1.0  # how often a waiting run retries the lock
WAIT_REPORT_S = 60.0  # a waiting run repeats its log line this often


_held: dict[Path, int] = {}  # workspace root -> descriptor of the lock this process holds


class WorkspaceBusy(VisionopsError):
    """Another pipeline run held the workspace for longer than this run was allowed to wait."""


def held_lock_fd(ws: Workspace) -> int | None:
    """The descriptor of ``ws``'s lock if this process holds it: pass it to child processes."""
    return _held.get(ws.root)


def _holder(fd: int) -> str:
    raw = os.pread(fd, 4096, 0).decode("utf-8", errors="replace").strip()
    if not raw:
        return "another process"
    try:
        info = json.loads(raw)
        return f"{info['holder']} (pid {info['pid']}, since {info['since']})"
    except (ValueError, KeyError, TypeError):
        return raw


@contextmanager
def workspace_lock(
    ws: Workspace, holder: str, timeout_s: float, on_wait: Callable[[str], None]
) -> Iterator[None]:
    """Hold the workspace's pipeline lock; wait up to ``timeout_s`` for it, telling ``on_wait`` why.

    Raises :class:`WorkspaceBusy` when the lock is still taken after ``timeout_s`` seconds.
    """
    path = ws.pipeline_lock
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        last_report = -WAIT_REPORT_S

        def report(waited: float) -> None:
            nonlocal last_report
            if waited - last_report >= WAIT_REPORT_S:
                on_wait(
                    f"waiting for the workspace lock {path}: held by {_holder(fd)};"
                    f" waited {waited:.0f} s of at most {timeout_s:.0f} s"
                )
                last_report = waited

        try:
            acquire_exclusive(fd, timeout_s, POLL_S, report)
        except LockTimeout as exc:
            raise WorkspaceBusy(
                f"workspace {ws.root} is still busy after {exc.waited_s:.0f} s: {_holder(fd)} holds"
                f" {path}; try again when it has finished, or raise schedule.lock_timeout_s"
            ) from None
        info = {"holder": holder, "pid": os.getpid(), "since": datetime.now(UTC).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        _held[ws.root] = fd
        try:
            yield
        finally:
            del _held[ws.root]
            os.ftruncate(fd, 0)
            # No LOCK_UN: a DVC still running (its run was killed) shares the lock and keeps it
            # until it exits; closing our descriptor is all that releases our share.
    finally:
        os.close(fd)
