"""The workspace lock across real processes: exclusive, bounded wait, no stale lock after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.workspace_lock import WorkspaceBusy, workspace_lock
from tasks.paths import Workspace

HOLD = """
import sys, time
from pathlib import Path
from flows.workspace_lock import workspace_lock
from tasks.paths import Workspace
with workspace_lock(Workspace(Path(sys.argv[1])), "holder-process", 5, print):
    print("locked", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path: Path):
    """A separate process holding the lock of ``tmp_path`` until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@pytest.mark.integration
def test_a_second_run_waits_then_gives_up_naming_the_holder(tmp_path: Path, holder: subprocess.Popen) -> None:
    waits: list[str] = []
    started = time.monotonic()
    with (
        pytest.raises(WorkspaceBusy, match=r"holder-process \(pid \d+") as exc,
        workspace_lock(Workspace(tmp_path), "second", 1.5, waits.append),
    ):
        pytest.fail("the lock was granted while another process held it")
    assert time.monotonic() - started >= 1.5
    assert "schedule.lock_timeout_s" in str(exc.value)
    assert waits and "waiting for the workspace lock" in waits[0] and f"pid {holder.pid}" in waits[0]


@pytest.mark.integration
def test_the_lock_is_free_as_soon_as_a_killed_holder_is_gone(tmp_path: Path, holder: subprocess.Popen) -> None:
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with workspace_lock(Workspace(tmp_path), "after-kill", 0, lambda line: pytest.fail(line)):
        info = json.loads(Workspace(tmp_path).pipeline_lock.read_text())
        assert info["holder"] == "after-kill" and info["pid"] == os.getpid()


@pytest.mark.integration
def test_a_waiting_run_gets_the_lock_when_the_holder_finishes(tmp_path: Path, holder: subprocess.Popen) -> None:
    waits: list[str] = []
    killer = subprocess.Popen([sys.executable, "-c", f"import os, time; time.sleep(1.5); os.kill({holder.pid}, 9)"])
    with workspace_lock(Workspace(tmp_path), "patient", 30, waits.append):
        assert holder.poll() is not None, "granted while the holder was still alive"
    killer.wait()
    assert len(waits) == 1


def test_the_lock_is_released_on_exit_and_on_error(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    with pytest.raises(RuntimeError), workspace_lock(ws, "failing", 0, print):
        raise RuntimeError("stage crashed")
    with workspace_lock(ws, "next", 0, lambda line: pytest.fail(line)):
        pass
    assert ws.pipeline_lock.read_text() == ""
