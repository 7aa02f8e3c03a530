"""Warm stage processes: a stage handed to the server runs as it would cold (same output, exit
status, directory, environment, arguments and inherited descriptors) in a child of the server that
already holds the preloaded modules; signals reach it; without a server it simply runs cold."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.warm_stages import SERVER_ENV

from conftest import PROJECT

pytestmark = pytest.mark.integration

PRELOADED = "xml.dom.minidom"  # light, and imported by nothing else here: present only if preloaded
PROBE = f"""
import json, os, sys, time
info = {{
    "pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(), "argv": sys.argv,
    "value": os.environ.get("PROBE_VALUE"), "server_env": os.environ.get("{SERVER_ENV}"),
    "stdin": sys.stdin.read(), "preloaded": "{PRELOADED}" in sys.modules,
}}
if "PROBE_FD" in os.environ:
    os.write(int(os.environ["PROBE_FD"]), b"through the inherited descriptor")
print(json.dumps(info), flush=True)
print("on stderr", file=sys.stderr)
if "PROBE_SLEEP" in os.environ:
    open("started", "w").close()
    time.sleep(float(os.environ["PROBE_SLEEP"]))
    open("finished", "w").close()
sys.exit(int(os.environ.get("PROBE_EXIT", "0")))
"""


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A folder with this project's tasks/ and a probe stage module in it."""
    shutil.copytree(PROJECT / "tasks", tmp_path / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "tasks" / "probe_stage.py").write_text(PROBE)
    return tmp_path


@pytest.fixture
def server(root: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    socket_path = root / "stages.sock"
    proc = subprocess.Popen([sys.executable, "-m", "tasks.warm_stages", str(socket_path), PRELOADED], cwd=root)
    deadline = time.monotonic() + 60
    while not socket_path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the server did not start listening"
        time.sleep(0.05)
    time.sleep(0.5)  # its one preload
    yield proc, socket_path
    proc.terminate()
    proc.wait(timeout=30)


def _stage(root: Path, socket_path: Path | None, **env: str) -> subprocess.Popen[str]:
    environment = {**os.environ, "PROBE_VALUE": "from the stage's environment", **env}
    environment.pop(SERVER_ENV, None)
    if socket_path is not None:
        environment[SERVER_ENV] = str(socket_path)
    fds = tuple(int(fd) for fd in [env.get("PROBE_FD")] if fd)
    return subprocess.Popen(
        [sys.executable, "-m", "tasks.probe_stage"], cwd=root, env=environment, text=True, pass_fds=fds,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def test_a_handed_over_stage_runs_as_it_would_cold_in_a_child_of_the_warm_server(root: Path, server) -> None:
    proc, socket_path = server
    read, write = os.pipe()
    try:
        warm = _stage(root, socket_path, PROBE_FD=str(write), PROBE_EXIT="3")
        out, err = warm.communicate("on stdin", timeout=60)
        assert os.read(read, 100) == b"through the inherited descriptor"
    finally:
        os.close(read)
        os.close(write)
    cold = _stage(root, None, PROBE_EXIT="3")
    cold_out, cold_err = cold.communicate("on stdin", timeout=60)
    assert warm.returncode == cold.returncode == 3, (err, cold_err)
    assert err == cold_err == "on stderr\n"
    ran, ran_cold = json.loads(out), json.loads(cold_out)
    assert ran["ppid"] == proc.pid and ran["pid"] != warm.pid, "the stage did not run in the server's child"
    assert ran_cold["ppid"] == os.getpid() and ran_cold["pid"] == cold.pid
    assert ran["preloaded"] and not ran_cold["preloaded"]
    for key in ("cwd", "argv", "value", "stdin", "server_env"):
        assert ran[key] == ran_cold[key], key
    assert ran["argv"] == [str(root / "tasks" / "probe_stage.py")] and ran["server_env"] is None


def test_a_signal_to_the_stage_process_stops_the_stage(root: Path, server) -> None:
    _, socket_path = server
    warm = _stage(root, socket_path, PROBE_SLEEP="30")
    assert warm.stdin is not None and warm.stdout is not None
    warm.stdin.close()
    child = json.loads(warm.stdout.readline())["pid"]
    while not (root / "started").exists():
        time.sleep(0.05)
    warm.send_signal(signal.SIGTERM)  # what DVC and the flow send when a run is cancelled
    assert warm.wait(timeout=30) == -signal.SIGTERM, "the stage process did not end as a cold one would"
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{child}").exists(), "the stage went on after its process was stopped"
    assert not (root / "finished").exists()


def test_without_a_reachable_server_the_stage_runs_cold(root: Path) -> None:
    cold = _stage(root, root / "no-server.sock")
    out, err = cold.communicate("", timeout=60)
    assert cold.returncode == 0, err
    assert json.loads(out)["pid"] == cold.pid
