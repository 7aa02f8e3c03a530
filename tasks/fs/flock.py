"""Exclusive ``flock`` with a bounded wait, shared by the workspace lock and the registry lock.

The kernel drops an flock when the last descriptor holding it closes, so a killed holder (even
kill -9) never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import time
from collections.abc import Callable


class LockTimeout(Exception):
    """The lock was still held by someone else after the allowed wait."""

    def __init__(self, waited_s: float) -> None:
        super().__init__(f"lock still held after {waited_s:.0f} s")
        self.waited_s = waited_s


def acquire_exclusive(fd: int, timeout_s: float, poll_s: float, on_wait: Callable[[float], None]) -> None:
    """Take an exclusive flock on ``fd``, retrying every ``poll_s``.

    ``on_wait(waited_s)`` is called after each failed try; :class:`LockTimeout` once ``timeout_s``
    has passed.
    """
    started = time.monotonic()
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            waited = time.monotonic() - started
            if waited >= timeout_s:
                raise LockTimeout(waited) from None
            on_wait(waited)
            time.sleep(poll_s)
