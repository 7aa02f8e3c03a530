"""Progress on long loops: a bar on a terminal, a log line at most every 10 s otherwise (and at the end).

`track` wraps any iterable and yields its items unchanged, so a loop gains progress by wrapping its
iterable; nothing else in the loop changes. Stage output under DVC or Prefect is not a terminal,
so there it becomes periodic log lines that read well in a Prefect run's log.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")

LOG_EVERY_S = 10.0  # s between log lines when stderr is not a terminal
_BAR_EVERY_S = 0.2  # s between redraws of the terminal bar
_BAR_WIDTH = 30  # characters


def _rate(done: int, seconds: float) -> str:
    return f"{done / seconds:,.1f}/s" if seconds > 0 else "-/s"


def _eta(done: int, total: int | None, seconds: float) -> str:
    if not total or done == 0 or done >= total:
        return ""
    remaining = round(seconds / done * (total - done))
    return f", ETA {remaining // 60:d}:{remaining % 60:02d}"


def _line(what: str, done: int, total: int | None, seconds: float) -> str:
    of = f"/{total}" if total is not None else ""
    return f"{what}: {done}{of} ({_rate(done, seconds)}{_eta(done, total, seconds)})"


def _bar(what: str, done: int, total: int | None, seconds: float) -> str:
    if not total:
        return "\r" + _line(what, done, total, seconds)
    filled = min(_BAR_WIDTH, _BAR_WIDTH * done // total)
    bar = "#" * filled + "." * (_BAR_WIDTH - filled)
    return f"\r{what} [{bar}] {done}/{total} ({_rate(done, seconds)}{_eta(done, total, seconds)})"


def track(
    items: Iterable[T],
    total: int | None,
    what: str,
    log: logging.Logger,
    stream: TextIO | None = None,
    clock: Callable[[], float] = time.monotonic,  # seconds; tests pass a fake one
) -> Iterator[T]:
    """Yield ``items``; report how many of ``total`` are done as a bar on a TTY, else in log lines."""
    out = stream if stream is not None else sys.stderr
    now = clock
    terminal = out.isatty()
    start = last = now()
    done = 0
    for item in items:
        yield item
        done += 1
        t = now()
        if terminal and t - last >= _BAR_EVERY_S:
            out.write(_bar(what, done, total, t - start))
            out.flush()
            last = t
        elif not terminal and t - last >= LOG_EVERY_S:
            log.info("%s", _line(what, done, total, t - start))
            last = t
    seconds = now() - start
    if terminal:
        out.write(_bar(what, done, total, seconds) + "\n")
        out.flush()
    else:
        log.info("%s done in %.1f s", _line(what, done, total, seconds), seconds)
