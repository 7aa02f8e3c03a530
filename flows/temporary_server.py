"""The Prefect API of a run when none is configured: a temporary local server, started by visionops.

Without ``PREFECT_API_URL`` (or a Prefect profile naming a server), Prefect starts a temporary
server itself when the flow is called: uvicorn serving ``prefect.server.api.server:create_app``.
visionops starts that same server itself, for two reasons:

- a killed run must not leave it behind (issue #10): the kernel sends it SIGTERM when the process
  that started it dies, however it dies (``PR_SET_PDEATHSIG``); Prefect's own outlives a SIGKILL;
- it starts first thing, so it boots while the command imports Prefect instead of after (#16).
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from flows.orphans import stop_with_parent
from tasks.errors import RuntimeUnavailable

STARTUP_S = 180.0  # s the server may take to start: its first start creates the database
STOP_S = 10.0  # s it gets to shut down after SIGTERM, then SIGKILL
# What Prefect 3.9's own temporary server sets (prefect.server.api.server.SubprocessASGIServer):
# no UI, no background services, a server that is the last of its database.
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}

_running: TemporaryServer | None = None  # one per process, reused by later runs of the same process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TemporaryServer:
    """A Prefect server on a free loopback port for this process's runs; stops when the process ends."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @classmethod
    def start(cls) -> TemporaryServer:
        spec = importlib.util.find_spec("prefect")  # the package's folder, without importing it (seconds)
        if spec is None or spec.origin is None:
            raise RuntimeUnavailable("Prefect is not installed in this environment: run `uv sync --frozen`")
        port = _free_port()
        fd, log = tempfile.mkstemp(prefix="visionops-prefect-server-", suffix=".log")
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "uvicorn",
                "--app-dir", str(Path(spec.origin).parent.parent),
                "--factory", "prefect.server.api.server:create_app",
                "--host", "127.0.0.1", "--port", str(port),
                "--log-level", "error", "--lifespan", "on",
            ],
            env={**os.environ, **SERVER_ENV},
            stdout=fd,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C stops the run, which still reports to the server, not the server
            preexec_fn=stop_with_parent(),
        )  # fmt: skip
        os.close(fd)
        server = cls(proc, port, Path(log))
        atexit.register(server.stop)  # registered before Prefect is imported: runs after Prefect's own flushes
        return server

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def wait_ready(self, timeout_s: float = STARTUP_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                output = self.log.read_text(errors="replace").strip().splitlines()[-5:]
                state = "exited" if self.proc.poll() is not None else f"did not answer in {timeout_s:.0f} s"
                self.stop()
                raise RuntimeUnavailable(
                    f"the temporary Prefect server {state}: {' | '.join(output) or 'no output'};"
                    " start one with `prefect server start` and set PREFECT_API_URL"
                )
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.unlink(missing_ok=True)


def start_unless_configured() -> None:
    """Start this process's temporary server now if nothing names a Prefect API yet: call it before
    importing Prefect (seconds), so the server boots meanwhile. :func:`prefect_api` decides whether
    it is used."""
    global _running
    if _running is None and not os.environ.get("PREFECT_API_URL") and "prefect" not in sys.modules:
        _running = TemporaryServer.start()


@contextmanager
def prefect_api(on_start: Callable[[str], None]) -> Iterator[None]:
    """Run the block against the configured Prefect API, or else this process's temporary server.

    When Prefect's settings name an API (the environment, a profile, a test harness), a server
    :func:`start_unless_configured` started is stopped unused.
    """
    global _running
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if get_current_settings().api.url:
        if _running is not None:
            _running.stop()
            _running = None
        yield
        return
    if _running is None:
        _running = TemporaryServer.start()
    on_start(f"Prefect API: a temporary server on {_running.api_url} for this run (set PREFECT_API_URL to use yours)")
    try:
        _running.wait_ready()
    except RuntimeUnavailable:
        _running = None
        raise
    with temporary_settings(updates={PREFECT_API_URL: _running.api_url}):
        yield
