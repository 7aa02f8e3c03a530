"""The pipeline's Prefect tasks: ingest, one task per dvc.yaml stage, and promotion.

The DVC stages run in one ``dvc repro`` (flows/dvc_repro.py), so a flow run does, skips and
records (dvc.lock) exactly what ``dvc repro`` would; each stage is its own task, which streams
the stage's output to the Prefect logger and times it. A failure names the stage and ends with the
stage's own error. A gate rejection (a stage exiting 3, or evaluate recording that the candidate
fails the floor) ends the task Rejected, not Failed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import yaml
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State
from prefect.tasks import exponential_backoff

from flows import artifacts
from flows.dvc_repro import DvcRepro, StageFailed, StageRun
from tasks.blessing.reports import MetricsReport
from tasks.errors import GateRejected
from tasks.params import Params
from tasks.paths import Workspace

if TYPE_CHECKING:
    from prefect.client.schemas.objects import TaskRun
    from prefect.tasks import Task

    from tasks.blessing.decision import PromotionDecision
    from tasks.ingest import IngestResult

INGEST_RETRIES = 3  # on top of the downloader's own quick retries: waits of 60, 120, 240 s
INGEST_BACKOFF_S = 60.0
REJECTED = "Rejected"  # the final state of a task or flow run whose candidate a gate rejected


def dvc_stages(ws: Workspace) -> list[str]:
    """The stages of dvc.yaml, in the order written there (the order the pipeline runs them)."""
    doc = yaml.safe_load(ws.dvc_yaml.read_text()) or {}
    return list(doc.get("stages") or {})


def rejected(exc: GateRejected) -> State[Any]:
    """A Completed state named Rejected: the run worked, and its candidate was refused."""
    return Completed(name=REJECTED, message=str(exc))


def raise_if_rejected(result: Any) -> Any:
    """``result`` of a task call, or :class:`GateRejected` when that task ended Rejected."""
    if isinstance(result, State) and result.name == REJECTED:
        raise GateRejected(result.message or "a gate rejected the candidate")
    return result


def gate_verdict(ws: Workspace, stage: str) -> GateRejected | None:
    """The rejection a stage recorded without failing (evaluate's floor, a DVC metric), if any."""
    if stage != "evaluate":
        return None
    floor = MetricsReport.read(ws.metrics, "evaluate").gate
    if floor.passed:
        return None
    return GateRejected(f"evaluate: candidate fails the accuracy floor: {'; '.join(floor.failures)}")


@task(name="dvc-stage", retries=0, cache_policy=NO_CACHE, persist_result=False)
def dvc_stage(repro: DvcRepro, stage: str) -> StageRun | State[Any]:
    """One DVC stage of the run's ``dvc repro``. Never retried blindly: rerunning the flow re-runs
    only what changed, and training resumes from its last epoch checkpoint."""
    log = get_run_logger()
    ws = repro.ws
    try:
        result = repro.finish_stage(stage, log)
    except StageFailed as exc:
        log.error("stage %s failed; its last output lines:\n%s", stage, exc.tail)
        artifacts.publish_stage_reports(ws, stage, since=repro.stage_started_at)
        raise
    except GateRejected as exc:
        artifacts.publish_stage_reports(ws, stage, since=repro.stage_started_at)
        log.warning("stage %s rejected the candidate: %s", stage, exc)
        return rejected(exc)
    log.info("stage %s %s in %.1f s", stage, "ran" if result.ran else "was up to date", result.seconds)
    artifacts.publish_stage_reports(ws, stage, since=None)
    if (verdict := gate_verdict(ws, stage)) is not None:
        log.warning("stage %s recorded that the candidate fails its gate: %s", stage, verdict)
        return rejected(verdict)
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
