"""tasks/fs/progress.py: items pass through unchanged; a bar on a terminal, timed log lines otherwise."""

from __future__ import annotations

import io
import logging

import pytest

from tasks.fs.progress import LOG_EVERY_S, track


class FakeClock:
    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_without_a_terminal_it_logs_at_most_every_10_s_and_at_the_end(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test-progress")
    clock = FakeClock(step=LOG_EVERY_S / 4)  # each item takes a quarter of the interval
    with caplog.at_level(logging.INFO, logger="test-progress"):
        items = list(track(range(20), 20, "scoring", log, stream=io.StringIO(), clock=clock))
    assert items == list(range(20))
    lines = [r.getMessage() for r in caplog.records]
    assert 4 <= len(lines) <= 6, lines  # 20 items x 2.5 s = 50 s -> a line per 10 s, then the end
    assert lines[0].startswith("scoring: ") and "/20" in lines[0] and "ETA" in lines[0]
    assert lines[-1].startswith("scoring: 20/20") and "done in" in lines[-1]


def test_on_a_terminal_it_draws_a_bar_and_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    terminal = Terminal()
    with caplog.at_level(logging.INFO):
        list(track(iter(range(5)), 5, "epoch 1/3", logging.getLogger("t"), stream=terminal, clock=FakeClock(1.0)))
    assert not caplog.records
    drawn = terminal.getvalue()
    assert drawn.startswith("\repoch 1/3 [") and drawn.endswith("\n")
    assert drawn.rsplit("\r", 1)[1].startswith("epoch 1/3 [" + "#" * 30 + "] 5/5 (")
    assert "] 1/5 (" in drawn and "ETA" in drawn


def test_an_unknown_total_still_counts(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="u"):
        list(track((i for i in range(3)), None, "files", logging.getLogger("u"), stream=io.StringIO()))
    assert caplog.records[-1].getMessage().startswith("files: 3 (")
