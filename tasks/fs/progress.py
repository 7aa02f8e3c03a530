"""Progress of a long loop (ingest, decoding, hashing): a bar on a terminal, periodic log lines otherwise.

Logs in a file or a Prefect run get one line every ``LOG_EVERY_S`` seconds and one at the end, so a
long stage shows it is alive without flooding its log.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

LOG_EVERY_S = 10.0  # s between progress log lines when stderr is not a terminal
BAR_EVERY_S = 0.2  # s between redraws of the terminal bar
BAR_WIDTH = 30  # characters


def _status(what: str, done: int, total: int | None, elapsed: float) -> str:
    rate = done / elapsed if elapsed > 0 else 0.0
    if total:
        eta = (total - done) / rate if rate > 0 else 0.0
        return f"{what}: {done:,}/{total:,} ({100 * done / total:.0f}%), {rate:,.0f}/s, {eta:.0f} s left"
    return f"{what}: {done:,}, {rate:,.0f}/s"


def _bar(what: str, done: int, total: int | None, elapsed: float) -> str:
    if not total:
        return _status(what, done, total, elapsed)
    filled = min(BAR_WIDTH, BAR_WIDTH * done // total)
    return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {_status(what, done, total, elapsed)}"


def track(items: Iterable[T], total: int | None, what: str, log: logging.Logger) -> Iterator[T]:
    """Yield ``items``, reporting how many have passed (of ``total``, when known) as ``what``."""
    tty = sys.stderr.isatty()
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if tty and now - last >= BAR_EVERY_S:
            print("\r" + _bar(what, done, total, now - start), end="", file=sys.stderr, flush=True)
            last = now
        elif not tty and now - last >= LOG_EVERY_S and done != total:  # the last line says "done"
            log.info("%s", _status(what, done, total, now - start))
            last = now
    elapsed = time.monotonic() - start
    if tty:
        print("\r" + _bar(what, done, total, elapsed), file=sys.stderr, flush=True)
    else:
        log.info("%s (done in %.1f s)", _status(what, done, total, elapsed), elapsed)
