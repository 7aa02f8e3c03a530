"""Warm stage processes: the heavy libraries imported once per pipeline run, each stage forked from them.

A stage is ``python -m tasks.<stage>`` (dvc.yaml). Started plainly, each imports torch and
torchvision, Great Expectations or onnxruntime itself: seconds per stage, the largest part of a
run's fixed cost (issue #16). During a flow run a server started by the flow imports them once,
in the background, and listens on the Unix socket named by ``$VISIONOPS_STAGE_SERVER``. When a
stage process starts with that variable set, the ``tasks`` package hands it over (:func:`hand_over`)
before any heavy import: it sends the server its module, working directory, environment and open
file descriptors (stdin, stdout, stderr and the inherited workspace lock); the server forks; the
child takes them over and runs the module as ``__main__``, exactly as ``python -m`` would; the stage
process waits, forwards signals, and exits with the child's status. Without the variable (plain
``dvc repro``), or when the server cannot be reached, the stage runs as it always did.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import importlib
import json
import logging
import os
import runpy
import select
import signal
import socket
import struct
import sys
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from types import FrameType

SERVER_ENV = "VISIONOPS_STAGE_SERVER"  # path of the server's socket, set for DVC and its stages by the flow
# What the stages import, in the order the pipeline needs them: prepare, validate, train, export, verify.
PRELOAD = (
    "numpy",
    "pyarrow.parquet",
    "PIL.Image",
    "pandas",
    "great_expectations",
    "torch",
    "torchvision",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "torch.onnx",
)
MAX_FDS = 64  # file descriptors a stage process may hand over
FD_FLOOR = 256  # a child moves what it received above this before placing it where the stage expects it
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_LEN = struct.Struct("!I")

log = logging.getLogger(__name__)


def _send(conn: socket.socket, message: dict[str, object], fds: Iterable[int] = ()) -> None:
    data = json.dumps(message).encode()
    fds = list(fds)
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    conn.sendmsg([_LEN.pack(len(data)) + data], ancillary)


def _receive(conn: socket.socket) -> tuple[dict[str, object] | None, list[int]]:
    """One message and the descriptors sent with it; (None, []) when the other side closed."""
    header, ancillary, _, _ = conn.recvmsg(_LEN.size, socket.CMSG_SPACE(MAX_FDS * 4))
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    if len(header) < _LEN.size:
        return None, list(fds)
    (size,) = _LEN.unpack(header)
    body = b""
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            return None, list(fds)
        body += chunk
    return json.loads(body), list(fds)


# --- the stage process ------------------------------------------------------------------------


def _stage_module() -> str | None:
    """``tasks.<stage>`` when this process is ``python -m tasks.<stage>``, else None."""
    argv = sys.orig_argv
    if len(argv) == 3 and argv[1] == "-m" and argv[2].startswith("tasks.") and argv[2] != __name__:
        return argv[2]
    return None


def _inherited_fds() -> list[int]:
    """The descriptors this process was started with: stdin, stdout, stderr and any passed on to it."""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            os.fstat(fd)
        except OSError:  # the listing's own descriptor, closed by now
            continue
        fds.append(fd)
    return sorted(fds)[:MAX_FDS]


def hand_over() -> None:
    """Run this stage process's module in a child of the warm server and exit with its status.

    Returns (and the stage runs here, cold) when this is not a stage process, or the server
    named by ``$VISIONOPS_STAGE_SERVER`` cannot take it.
    """
    path, module = os.environ.get(SERVER_ENV), _stage_module()
    if not path or module is None:
        return
    fds = _inherited_fds()
    forwarded: list[int] = []  # signals this process got: the child's once it has one
    child: int | None = None

    def forward(signum: int, frame: FrameType | None) -> None:
        forwarded.append(signum)
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child, signum)  # the stage and any workers it started

    previous = {sig: signal.getsignal(sig) for sig in _FORWARDED}
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        env = {k: v for k, v in os.environ.items() if k != SERVER_ENV}
        for sig in _FORWARDED:
            signal.signal(sig, forward)
        _send(conn, {"module": module, "cwd": os.getcwd(), "env": env, "fds": fds}, fds)
        started, _ = _receive(conn)
    except OSError:
        started = None
    if started is None or not isinstance(started.get("pid"), int):
        conn.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if forwarded:  # a signal that came meanwhile is this process's own again
            os.kill(os.getpid(), forwarded[-1])
        return
    child = int(started["pid"])  # type: ignore[call-overload]
    if forwarded:  # a signal came while the server forked it
        forward(forwarded[-1], None)
    ended, _ = _receive(conn)
    status = ended.get("status") if ended is not None else None
    if isinstance(status, int):
        os._exit(status)
    if forwarded:  # the stage died of the signal this process passed on: so does this process
        signal.signal(forwarded[-1], signal.SIG_DFL)
        os.kill(os.getpid(), forwarded[-1])
    print(f"visionops: the stage process {child} ended without an exit status", file=sys.stderr)
    os._exit(1)


# --- the server -------------------------------------------------------------------------------


def _lift(fd: int) -> int:
    """``fd`` moved to a high number (close-on-exec), out of the way of the numbers a stage expects."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, FD_FLOOR)
    os.close(fd)
    return high


@dataclass(frozen=True)
class StageRequest:
    """What a stage process hands over: the module it runs and where, how, with what open."""

    module: str
    cwd: str
    env: dict[str, str]
    fds: list[int]  # the numbers the stage process had them at, in the order they were sent

    @classmethod
    def of(cls, message: dict[str, object]) -> StageRequest:
        env, fds = message["env"], message["fds"]
        if not isinstance(env, dict) or not isinstance(fds, list):
            raise ValueError(f"not a stage request: {message!r}")
        return cls(str(message["module"]), str(message["cwd"]), {str(k): str(v) for k, v in env.items()},
                   [int(fd) for fd in fds])  # fmt: skip


def _run_child(conn: socket.socket, request: StageRequest, fds: list[int]) -> int:
    """In the forked child: become the stage process described by ``request``; its exit status."""
    conn = socket.socket(fileno=_lift(conn.detach()))
    lifted = [_lift(fd) for fd in fds]
    for received, target in zip(lifted, request.fds, strict=True):
        os.dup2(received, target, inheritable=True)
        os.close(received)
    os.chdir(request.cwd)
    os.environ.clear()
    os.environ.update(request.env)
    sys.argv[:] = ["-m"]  # what `python -m` starts with; runpy puts the module's file in its place
    logging.root.handlers.clear()  # the stage configures its own logging, as a fresh process would
    try:
        runpy.run_module(request.module, run_name="__main__", alter_sys=True)
        status = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            status = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            status = 1
    except BaseException:
        traceback.print_exc()
        status = 1
    logging.shutdown()  # what interpreter exit would flush; the server's other exit handlers are not the stage's
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    _send(conn, {"status": status})
    return status


def _serve_one(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    fds: list[int] = []
    try:
        message, fds = _receive(conn)
        request = StageRequest.of(message) if message is not None else None
    except (OSError, ValueError, KeyError):
        request = None
    if request is None or len(fds) != len(request.fds):  # not a stage process of ours: it runs cold
        for fd in fds:
            os.close(fd)
        conn.close()
        return
    pid = os.fork()
    if pid == 0:  # the stage
        status = 1
        try:
            listener.close()
            os.setpgid(0, 0)  # its own group: a forwarded signal reaches its workers too
            for sig in (signal.SIGCHLD, signal.SIGTERM):  # a stage process's defaults, not the server's
                signal.signal(sig, signal.SIG_DFL)
            status = _run_child(conn, request, fds)
        finally:
            os._exit(status)
    for fd in fds:
        os.close(fd)
    try:
        _send(conn, {"pid": pid})
    finally:
        conn.close()


def serve(path: str, preload: Iterable[str] = PRELOAD) -> None:
    """Listen on ``path``; import ``preload`` one module at a time between requests, and fork a
    child for each stage that connects. Runs until SIGTERM."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    pending = list(preload)
    while True:
        ready, _, _ = select.select([listener], [], [], 0 if pending else None)
        if ready:
            _serve_one(listener)
        elif pending:
            name = pending.pop(0)
            try:
                importlib.import_module(name)
            except ImportError as exc:  # an optional library: the stage that needs it reports it
                log.debug("not preloaded: %s (%s)", name, exc)


if __name__ == "__main__":  # python -m tasks.warm_stages SOCKET [MODULE ...] (default: PRELOAD)
    serve(sys.argv[1], sys.argv[2:] or PRELOAD)
