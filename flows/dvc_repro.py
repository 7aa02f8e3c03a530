"""One ``dvc repro`` per pipeline run, read stage by stage.

The flow starts DVC once for the whole pipeline (one DVC start-up, one look at the cache and
dvc.lock; issue #16) and reads its output. DVC announces every stage it reaches, run or skipped
("Running stage 'train':", "Stage 'train' didn't change, skipping"), so each line belongs to one
stage, and each stage starts at its announcement and ends at the next one. A reader thread stamps
every line as it arrives, so a stage's time is its own even while the flow is busy elsewhere.

A stage that exits non-zero ends DVC: exit 3 is a gate rejection (:class:`GateRejected`), any
other status a :class:`StageFailed` that names the stage and carries the stage's own error.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.workspace_lock import held_lock_fd
from tasks.entry import ERROR_PREFIX
from tasks.errors import GateRejected, VisionopsError
from tasks.paths import Workspace

TAIL_LINES = 30  # lines of a failed stage's output kept for its error message
STOP_WAIT_S = 30.0  # s DVC and its stage get to stop after SIGTERM, then SIGKILL
# DVC's advice after each stage (git add dvc.lock, dvc push): noise in a run log, kept at DEBUG.
_DVC_HINTS = (
    "To track the changes with git",
    "git add ",
    "To enable auto staging",
    "dvc config core.autostage",
    "Use `dvc push`",
)
_DVC_FAILED = re.compile(r"failed to run: .*, exited with (-?\d+)")
_ANNOUNCED = re.compile(r"^(?:Running stage '(?P<ran>[^']+)':|Stage '(?P<skipped>[^']+)' didn't change, skipping)")


class StageFailed(VisionopsError):
    """A DVC stage exited non-zero for a reason other than a gate; names the stage and the cause."""

    def __init__(self, stage: str, reason: str, tail: str) -> None:
        super().__init__(f"stage {stage!r} failed: {reason}")
        self.stage = stage
        self.reason = reason
        self.tail = tail


@dataclass(frozen=True)
class StageRun:
    stage: str
    seconds: float  # from DVC announcing the stage to announcing the next one (the first: from DVC's start)
    ran: bool  # False when DVC found the stage up to date and skipped it


@dataclass(frozen=True)
class _Line:
    monotonic: float
    epoch: float
    text: str | None  # None: DVC's output ended


def stage_env() -> dict[str, str]:
    """The environment of DVC and its stages: this interpreter's bin/ first, so ``python -m
    tasks.<stage>`` runs in the same environment as visionops even when the venv is not activated."""
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONUNBUFFERED": "1",  # stream stage logs as they happen, not when a buffer fills
        "DVC_NO_ANALYTICS": "1",
    }


def failure_reason(lines: list[str]) -> str:
    """The stage's own error from its output: the ``visionops: error:`` line of ``tasks.entry`` (or an
    ``ERROR`` log record) and what follows it, else the last line before DVC's report (a traceback's
    last line)."""
    own = [line for line in lines if not line.startswith("ERROR: failed to reproduce")]
    for i in range(len(own) - 1, -1, -1):
        if own[i].startswith(ERROR_PREFIX) or " ERROR " in own[i]:
            found = own[i]
            first = found.removeprefix(ERROR_PREFIX) if found.startswith(ERROR_PREFIX) else found.split(" ERROR ", 1)[1]
            return " ".join([first, *(line.strip() for line in own[i + 1 :] if line.strip())])
    meaningful = [line.strip() for line in own if line.strip()]
    return meaningful[-1] if meaningful else "no output"


class DvcRepro:
    """A running ``dvc repro`` of the workspace; :meth:`next_stage` and :meth:`finish_stage` walk it."""

    def __init__(self, ws: Workspace, proc: subprocess.Popen[str]) -> None:
        self.ws = ws
        self._proc = proc
        self._lines: queue.Queue[_Line] = queue.Queue()
        self._pending: list[_Line] = []  # read ahead: the lines of the stage announced next
        self._announced: tuple[str, bool, _Line] | None = None  # (stage, ran, its announcement)
        self._since = time.monotonic()  # where the next stage's time starts: DVC's own start-up is the first's
        self._ended = False
        self.stage_started_at = time.time()  # epoch of the current stage's announcement: older reports aren't its
        threading.Thread(target=self._pump, name="dvc-repro-output", daemon=True).start()

    @classmethod
    @contextmanager
    def start(cls, ws: Workspace, *targets: str, env: Mapping[str, str] | None = None) -> Iterator[DvcRepro]:
        """``dvc repro [targets]`` in ``ws`` (``env`` added to its environment); stopped with its
        stage if the caller leaves early."""
        lock_fd = held_lock_fd(ws)
        proc = subprocess.Popen(
            [sys.executable, "-m", "dvc", "repro", *targets],
            cwd=ws.root,
            env={**stage_env(), **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            pass_fds=() if lock_fd is None else (lock_fd,),  # the stages hold the workspace lock too
            # its own process group: stopped as one when the run is stopped. A run killed with SIGKILL
            # leaves DVC to finish, holding the workspace lock till then (its stages do not hold it).
            start_new_session=True,
        )
        repro = cls(ws, proc)
        try:
            yield repro
        finally:
            repro._stop()

    def _pump(self) -> None:
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            if line := raw.rstrip():
                self._lines.put(_Line(time.monotonic(), time.time(), line))
        self._lines.put(_Line(time.monotonic(), time.time(), None))

    def _stop(self) -> None:
        """Stop DVC and its stage (cancelled or interrupted run), or reap it when it has ended."""
        if self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait()

    def _read(self) -> _Line:
        line = self._lines.get()
        if line.text is None:
            self._ended = True
        return line

    def _announce(self, match: re.Match[str], line: _Line) -> str:
        stage = match.group("ran") or match.group("skipped")
        self._announced = (stage, match.group("ran") is not None, line)
        return stage

    def next_stage(self) -> str | None:
        """The stage DVC announces next, or None when DVC has ended (done, or a stage failed).

        Raises :class:`StageFailed` when DVC ended with an error before announcing any stage.
        """
        if self._announced is not None:
            return self._announced[0]
        while not self._ended:
            line = self._read()
            if line.text is None:
                break
            self._pending.append(line)
            if match := _ANNOUNCED.match(line.text):
                return self._announce(match, line)
        if self._pending and self._proc.wait() != 0:  # lines no stage claimed: DVC's own error
            lines = [line.text for line in self._pending if line.text is not None]
            self._pending = []
            reason = next((line.removeprefix("ERROR: ") for line in reversed(lines) if line.startswith("ERROR")), None)
            raise StageFailed("dvc repro", reason or failure_reason(lines), "\n".join(lines))
        return None

    def _stage_lines(self) -> Iterator[_Line]:
        """The lines read ahead, then DVC's output as it comes, ending with the end-of-output line."""
        pending, self._pending = self._pending, []
        yield from pending
        while not self._ended:
            yield self._read()

    def finish_stage(self, stage: str, log: Any) -> StageRun:
        """Log ``stage``'s output to ``log`` until DVC announces the next stage or ends.

        Raises :class:`GateRejected` when the stage exited 3, :class:`StageFailed` otherwise.
        """
        if (announced := self.next_stage()) != stage or self._announced is None:
            raise StageFailed(stage, f"DVC announced {announced!r} where the flow expected {stage!r}", "")
        _, ran, announcement = self._announced
        self._announced = None
        self.stage_started_at = announcement.epoch
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        end = _Line(time.monotonic(), time.time(), None)
        for line in self._stage_lines():
            if line.text is None:
                end = line
                break
            if line is not announcement and (match := _ANNOUNCED.match(line.text)):
                self._announce(match, line)
                self._pending = [line]
                end = line
                break
            tail.append(line.text)
            hint = line.text.strip().startswith(_DVC_HINTS)
            log.log(logging.DEBUG if hint else logging.INFO, "%s | %s", stage, line.text)
        seconds, self._since = end.monotonic - self._since, end.monotonic
        if end.text is not None or self._proc.wait() == 0:
            return StageRun(stage, seconds, ran)
        output = list(tail)
        status = next((m.group(1) for line in output if (m := _DVC_FAILED.search(line))), None)
        reason = failure_reason(output)
        if status == str(GateRejected.exit_code):
            raise GateRejected(f"{stage}: {reason.removeprefix('GateRejected: ')}")
        raise StageFailed(stage, reason, "\n".join(output))
