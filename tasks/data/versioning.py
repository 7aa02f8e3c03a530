"""Versioning of data/ with DVC: ``dvc add`` (updates data.dvc) and ``dvc push`` to the default remote.

The real ``dvc`` command of this interpreter's environment is run, so the result is exactly what a
user typing the commands would get.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tasks.errors import DataError, RuntimeUnavailable
from tasks.paths import Workspace

log = logging.getLogger(__name__)


def run_dvc(ws: Workspace, *args: str) -> str:
    """``dvc <args>`` in the workspace; its stdout. :class:`DataError` with DVC's message on failure."""
    if not (ws.root / ".dvc").is_dir():
        raise DataError(f"{ws.root} is not a DVC repository: run `git init && dvc init` there first")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=ws.root, env=env, text=True, capture_output=True, check=False
    )
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise DataError(f"`dvc {' '.join(args)}` failed in {ws.root} (exit {proc.returncode}): {' | '.join(detail)}")
    return proc.stdout


def tracked_md5(dvc_file: Path) -> str | None:
    """The md5 a ``.dvc`` file records for its output, or None when there is no such file."""
    if not dvc_file.is_file():
        return None
    doc = yaml.safe_load(dvc_file.read_text()) or {}
    outs = doc.get("outs") or [{}]
    return outs[0].get("md5")


def add(ws: Workspace, target: Path) -> Path:
    """``dvc add <target>``: caches it and writes ``<target>.dvc``; returns that file."""
    rel = target.relative_to(ws.root).as_posix()
    run_dvc(ws, "add", "--quiet", rel)
    return target.with_name(target.name + ".dvc")


def push(ws: Workspace, dvc_file: Path) -> None:
    """``dvc push <dvc_file>`` to the default remote; :class:`RuntimeUnavailable` if it cannot."""
    rel = dvc_file.relative_to(ws.root).as_posix()
    try:
        run_dvc(ws, "push", "--quiet", rel)
    except DataError as exc:
        raise RuntimeUnavailable(f"{exc}; check `dvc remote list` and that the remote is reachable") from exc
