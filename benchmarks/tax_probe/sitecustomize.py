"""Measurement probe of benchmarks/pipeline_tax.py: where each Python process of a run spends its time.

Python imports ``sitecustomize`` at start-up when it is on ``sys.path``; the benchmark puts this
folder on ``PYTHONPATH`` for one pipeline run, so every Python process of that run (the visionops
CLI, each ``dvc``, each ``python -m tasks.<stage>``) records, when it exits, one JSON line into
``$PIPELINE_TAX_RECORDS``: its command line, when the kernel started it, when this probe ran (the
interpreter's own start-up done), when it exited, every outermost import with its start and
duration (lazy imports inside functions included), and the windows of the in-process steps
(``tasks.ingest.ingest``, ``tasks.promote.promote``). A forked child (a stage run by the warm stage
server, tasks/warm_stages.py) records itself from the fork on. It changes no result: it only
reads clocks.
"""

from __future__ import annotations

import atexit
import functools
import importlib._bootstrap as bootstrap  # every import that loads a module goes through _find_and_load
import json
import os
import sys
import threading
import time
from typing import Any, NoReturn

_RECORDS = os.environ.get("PIPELINE_TAX_RECORDS")
_WRAPPED_CALLS = {"tasks.ingest": "ingest", "tasks.promote": "promote"}  # module -> function timed in-process


def _process_start() -> float:
    """When the kernel started this process (epoch seconds, 10 ms resolution)."""
    with open(f"/proc/{os.getpid()}/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks since boot
    with open("/proc/stat") as f:
        boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _install(path: str) -> None:
    record: dict[str, Any] = {
        "argv": list(sys.orig_argv),
        "pid": os.getpid(),
        "started": _process_start(),
        "site": time.time(),
        "imports": [],  # [start epoch, seconds, module] of outermost imports, per thread
        "calls": [],  # [name, start epoch, end epoch]
    }
    depth = threading.local()
    find_and_load = bootstrap._find_and_load  # type: ignore[attr-defined]

    def timed_call(name: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.time()
            try:
                return fn(*args, **kwargs)
            finally:
                record["calls"].append([name, start, time.time()])

        return call

    def probed(name: str, import_: Any) -> Any:
        level = getattr(depth, "level", 0)
        depth.level = level + 1
        start, t0 = time.time(), time.perf_counter()
        try:
            module = find_and_load(name, import_)
        finally:
            depth.level = level
            if level == 0:
                record["imports"].append([start, time.perf_counter() - t0, name])
        if name in _WRAPPED_CALLS:
            fn_name = _WRAPPED_CALLS[name]
            setattr(module, fn_name, timed_call(fn_name, getattr(module, fn_name)))
        return module

    bootstrap._find_and_load = probed  # type: ignore[attr-defined]

    @atexit.register
    def write() -> None:
        record["ended"] = time.time()
        line = (json.dumps(record) + "\n").encode()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def forked() -> None:
        """A forked child (a warm stage, a worker) is a process of its own: record it from here."""
        now = time.time()
        record.update(argv=["<forked>"], forked_from=os.getppid(), pid=os.getpid(), started=now, site=now)
        record.update(imports=[], calls=[])

    os.register_at_fork(after_in_child=forked)
    real_exit = os._exit

    def exit_recorded(status: int) -> NoReturn:  # forked children end with os._exit, which skips atexit
        write()
        real_exit(status)

    os._exit = exit_recorded


if _RECORDS:
    _install(_RECORDS)
