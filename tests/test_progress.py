"""tasks/fs/progress.py: a long loop reports progress: log lines when not on a terminal, a bar on one."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from tasks.fs import progress
from tasks.fs.progress import track


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_log_lines_at_most_every_interval_and_at_the_end(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    clock = _Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    caplog.set_level(logging.INFO)
    seen = []
    for item in track(range(100), 100, "decode train", logging.getLogger("t")):
        seen.append(item)
        clock.now += 0.5  # 50 s in all: one line per 10 s, not one per item
    assert seen == list(range(100))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5, lines
    assert lines[0].startswith("decode train: 20/100 (20%), 2/s, 40 s left")
    assert lines[-1].startswith("decode train: 100/100 (100%)") and "done in 50.0 s" in lines[-1]


def test_a_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = Tty()
    monkeypatch.setattr(sys, "stderr", err)
    caplog.set_level(logging.INFO)
    assert list(track(iter(range(3)), None, "ingest", logging.getLogger("t"))) == [0, 1, 2]
    last = err.getvalue().rsplit("\r", 1)[-1]
    assert last.startswith("ingest: 3, ") and last.endswith("/s\n"), err.getvalue()
    assert not caplog.records
