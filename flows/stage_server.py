"""The warm stage server of a pipeline run (tasks/warm_stages.py): up for the run, gone after it.

Started when the run starts, it imports torch, torchvision, Great Expectations and onnxruntime in
the background while ingest works, so the stages DVC starts later fork from it instead of each
importing them again (issue #16). It dies with the run, however the run ends.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from flows.dvc_repro import stage_env
from flows.orphans import stop_with_parent
from tasks.paths import Workspace
from tasks.warm_stages import SERVER_ENV

STOP_S = 10.0  # s the server gets to exit after SIGTERM, then SIGKILL
STAGE_COMMAND = "python -m tasks."  # what a visionops stage's cmd in dvc.yaml starts with


def runs_visionops_stages(ws: Workspace) -> bool:
    """Whether dvc.yaml's stages are visionops stages (only those can be handed to the server)."""
    stages = (yaml.safe_load(ws.dvc_yaml.read_text()) or {}).get("stages") or {}
    return any(str(stage.get("cmd", "")).startswith(STAGE_COMMAND) for stage in stages.values())


@contextmanager
def warm_stage_server(ws: Workspace, warn: Callable[[str], None]) -> Iterator[dict[str, str]]:
    """Start the server; yield the environment that sends DVC's stages to it (empty: none started)."""
    if not runs_visionops_stages(ws):
        yield {}
        return
    folder = Path(tempfile.mkdtemp(prefix="visionops-stages-"))
    socket_path, log = folder / "socket", folder / "server.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tasks.warm_stages", str(socket_path)],
            cwd=ws.root,
            env=stage_env(),
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=stop_with_parent(),
        )
    try:
        yield {SERVER_ENV: str(socket_path)}
    finally:
        if proc.poll() is not None:  # it ended on its own: the stages ran cold, and said nothing
            warn(f"the warm stage server exited {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
        else:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(folder, ignore_errors=True)
