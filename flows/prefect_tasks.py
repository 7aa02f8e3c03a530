"""The pipeline's Prefect tasks: ingest, one task per dvc.yaml stage, and promotion.

Each DVC stage runs as ``dvc repro --single-item <stage>`` in the workspace, so a flow run does,
skips and records (dvc.lock) exactly what ``dvc repro`` would. The stage's output is streamed
line by line to the Prefect logger; a failure names the stage and ends with the stage's own
error. Exit status 3 is a gate rejection (:class:`GateRejected`), not a crash.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State
from prefect.tasks import exponential_backoff

from flows import artifacts
from flows.workspace_lock import held_lock_fd
from tasks.entry import ERROR_PREFIX
from tasks.errors import GateRejected, VisionopsError
from tasks.params import Params
from tasks.paths import Workspace

if TYPE_CHECKING:
    from prefect.client.schemas.objects import TaskRun
    from prefect.tasks import Task

    from tasks.blessing.decision import PromotionDecision
    from tasks.ingest import IngestResult

TAIL_LINES = 30  # lines of a failed stage's output kept for its error message
INGEST_RETRIES = 3  # on top of the downloader's own quick retries: waits of 60, 120, 240 s
INGEST_BACKOFF_S = 60.0
REJECTED = "Rejected"  # the final state of a task or flow run whose candidate a gate rejected
# DVC's advice after each stage (git add dvc.lock, dvc push): noise in a run log, kept at DEBUG.
_DVC_HINTS = (
    "To track the changes with git",
    "git add ",
    "To enable auto staging",
    "dvc config core.autostage",
    "Use `dvc push`",
)
_DVC_FAILED = re.compile(r"failed to run: .*, exited with (-?\d+)")


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
    seconds: float  # wall time of the stage, dvc's own start-up included
    ran: bool  # False when DVC found the stage up to date and skipped it


def dvc_stages(ws: Workspace) -> list[str]:
    """The stages of dvc.yaml, in the order written there (the order the pipeline runs them)."""
    doc = yaml.safe_load(ws.dvc_yaml.read_text()) or {}
    return list(doc.get("stages") or {})


def stage_env() -> dict[str, str]:
    """The environment of a stage: this interpreter's bin/ first, so ``python -m tasks.<stage>``
    runs in the same environment as visionops even when the venv is not activated."""
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


def run_dvc_stage(ws: Workspace, stage: str, log: Any) -> StageRun:
    """``dvc repro --single-item <stage>`` with its output streamed to ``log``.

    Raises :class:`GateRejected` when the stage exited 3, :class:`StageFailed` otherwise.
    """
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    log.info("$ dvc repro --single-item %s", stage)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    ran = True
    lock_fd = held_lock_fd(ws)
    started = time.monotonic()
    with subprocess.Popen(
        cmd,
        cwd=ws.root,
        env=stage_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        pass_fds=() if lock_fd is None else (lock_fd,),  # the stage holds the workspace lock too
        start_new_session=True,  # its own process group: stopped as one when the run is stopped
    ) as proc:
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                line = raw.rstrip()
                if not line:
                    continue
                tail.append(line)
                if "didn't change, skipping" in line:
                    ran = False
                log.log(logging.DEBUG if line.strip().startswith(_DVC_HINTS) else logging.INFO, "%s | %s", stage, line)
        except BaseException:  # cancelled or interrupted: stop dvc and the stage with it
            os.killpg(proc.pid, signal.SIGTERM)
            raise
    seconds = time.monotonic() - started
    if proc.returncode == 0:
        return StageRun(stage, seconds, ran)
    lines = list(tail)
    status = next((m.group(1) for line in lines if (m := _DVC_FAILED.search(line))), None)
    reason = failure_reason(lines)
    if status == str(GateRejected.exit_code):
        raise GateRejected(f"{stage}: {reason.removeprefix('GateRejected: ')}")
    raise StageFailed(stage, reason, "\n".join(lines))


def rejected(exc: GateRejected) -> State[Any]:
    """A Completed state named Rejected: the run worked, and its candidate was refused."""
    return Completed(name=REJECTED, message=str(exc))


def raise_if_rejected(result: Any) -> Any:
    """``result`` of a task call, or :class:`GateRejected` when that task ended Rejected."""
    if isinstance(result, State) and result.name == REJECTED:
        raise GateRejected(result.message or "a gate rejected the candidate")
    return result


@task(name="dvc-stage", retries=0, cache_policy=NO_CACHE, persist_result=False)
def dvc_stage(ws: Workspace, stage: str) -> StageRun | State[Any]:
    """One DVC stage. Never retried blindly: rerunning the flow re-runs only what changed, and
    training resumes from its last epoch checkpoint. A gate rejection ends it Rejected."""
    log = get_run_logger()
    started = time.time()
    try:
        result = run_dvc_stage(ws, stage, log)
    except StageFailed as exc:
        log.error("stage %s failed; its last output lines:\n%s", stage, exc.tail)
        artifacts.publish_stage_reports(ws, stage, since=started)
        raise
    except GateRejected as exc:
        artifacts.publish_stage_reports(ws, stage, since=started)
        log.warning("stage %s rejected the candidate: %s", stage, exc)
        return rejected(exc)
    log.info("stage %s %s in %.1f s", stage, "ran" if result.ran else "was up to date", result.seconds)
    artifacts.publish_stage_reports(ws, stage, since=None)
    return result


def _transient(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry ingestion only for network failures that may pass (timeouts, resets, 5xx)."""
    from tasks.data.downloads import TransientDownloadError

    exc = state.result(raise_on_failure=False)
    return isinstance(exc, TransientDownloadError)


@task(
    name="ingest",
    retries=INGEST_RETRIES,
    retry_delay_seconds=exponential_backoff(INGEST_BACKOFF_S),
    retry_condition_fn=_transient,
    cache_policy=NO_CACHE,
    persist_result=False,
)
def ingest_data(ws: Workspace, params: Params) -> IngestResult:
    """A new version of data/ from ``data.source`` (unchanged content leaves data.dvc as it is)."""
    from tasks.ingest import ingest

    result = ingest(params.data, ws)
    get_run_logger().info(
        "data/ from %s: %s (md5 %s)", result.source, "updated" if result.changed else "unchanged", result.md5
    )
    return result


@task(name="promote", retries=0, cache_policy=NO_CACHE, persist_result=False)
def promote_candidate(ws: Workspace, params: Params) -> PromotionDecision | State[Any]:
    """Promote the verified candidate, or end Rejected saying why not."""
    from tasks.promote import promote

    try:
        decision = promote(params, ws)
    except GateRejected as exc:
        if (refused := getattr(exc, "decision", None)) is not None:
            artifacts.publish_decision(refused)
        get_run_logger().warning("promotion rejected the candidate: %s", exc)
        return rejected(exc)
    artifacts.publish_decision(decision)
    return decision
