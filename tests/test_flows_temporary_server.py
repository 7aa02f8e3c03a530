"""The temporary Prefect server of a run without a configured API: started by visionops, and gone
when the run ends, even when the run is killed with SIGKILL (issue #10); so is the run's warm stage server."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows import temporary_server
from tasks.paths import Workspace

from conftest import VENV_BIN

STARTUP_S = 240  # the server's first start creates its database; a loaded 2-core machine is slow
ANNOUNCED = re.compile(r"temporary server on http://127\.0\.0\.1:(\d+)/api")


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live processes whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append((int(stat.parent.name), cmdline))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _visionops_run(ws: Workspace, tmp_path: Path, *overrides: str) -> tuple[subprocess.Popen[bytes], Path]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    err = tmp_path / "visionops.err"
    args = [arg for kv in overrides for arg in ("-S", kv)]
    cmd = [str(VENV_BIN / "visionops"), "run", *args]
    proc = subprocess.Popen(cmd, cwd=ws.root, env=env, stderr=err.open("wb"), stdout=subprocess.DEVNULL)
    return proc, err


def _announced_port(proc: subprocess.Popen[bytes], err: Path) -> int:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if match := ANNOUNCED.search(err.read_text()):
            return int(match.group(1))
        assert proc.poll() is None, err.read_text()
        time.sleep(0.2)
    pytest.fail(f"visionops run announced no temporary server in {STARTUP_S} s:\n{err.read_text()}")


@pytest.mark.integration
def test_a_run_killed_with_sigkill_leaves_no_prefect_server_running(workspace: Workspace, tmp_path: Path) -> None:
    proc, err = _visionops_run(workspace, tmp_path, "data.source=synthetic")
    try:
        port = _announced_port(proc, err)
        deadline = time.monotonic() + STARTUP_S
        while not _listening(port):
            assert time.monotonic() < deadline and proc.poll() is None, err.read_text()
            time.sleep(0.2)
        servers = [pid for pid, cmd in _children(proc.pid) if "uvicorn" in cmd and str(port) in cmd]
        assert len(servers) == 1, _children(proc.pid)
        # The flow starts its warm stage server as it begins, before ingest: killed with the run too.
        while not (stage_servers := [pid for pid, cmd in _children(proc.pid) if "tasks.warm_stages" in cmd]):
            assert time.monotonic() < deadline and proc.poll() is None, err.read_text()
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + temporary_server.STOP_S + 10
    while (_alive(servers[0]) or _alive(stage_servers[0])) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(servers[0]), "the temporary Prefect server outlived its killed run"
    assert not _listening(port)
    assert not _alive(stage_servers[0]), "the warm stage server outlived its killed run"


@pytest.mark.integration
def test_a_failed_run_stops_its_server_and_puts_params_yaml_back(workspace: Workspace, tmp_path: Path) -> None:
    before = workspace.params_file.read_bytes()
    proc, err = _visionops_run(workspace, tmp_path, "data.source=/nonexistent/images", "train.epochs=1")
    port = _announced_port(proc, err)
    assert proc.wait(timeout=STARTUP_S) == 1, err.read_text()
    last = err.read_text().strip().splitlines()[-1]
    assert last.startswith("visionops: error: data source /nonexistent/images not found"), last
    assert workspace.params_file.read_bytes() == before, "the failed run left its overrides in params.yaml"
    assert not _listening(port), "the temporary Prefect server outlived its run"


def test_a_configured_api_is_used_and_no_server_is_started() -> None:
    temporary_server.start_unless_configured()  # Prefect is imported here: too late to start one early
    assert temporary_server._running is None
    with (
        temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}),
        temporary_server.prefect_api(on_start=pytest.fail),
    ):
        assert temporary_server._running is None
