"""Reading a flow run's task runs, logs and artifacts back from a real Prefect API (test helpers)."""

from __future__ import annotations

from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    ArtifactFilter,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
    TaskRunFilter,
)
from prefect.client.schemas.objects import TaskRun
from prefect.client.schemas.sorting import ArtifactSort, LogSort

PAGE = 200  # API rows read at once


def _of_run(flow_run_id: UUID) -> FlowRunFilter:
    return FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))


def artifact_keys(client: SyncPrefectClient, flow_run_id: UUID) -> set[str]:
    # The sync client sends None for every omitted field, which the API refuses: pass them all.
    artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(),
        flow_run_filter=_of_run(flow_run_id),
        task_run_filter=TaskRunFilter(),
        limit=PAGE,
        offset=0,
        sort=ArtifactSort.CREATED_DESC,
    )
    return {a.key for a in artifacts if a.key}


def task_runs(client: SyncPrefectClient, flow_run_id: UUID) -> list[TaskRun]:
    return client.read_task_runs(flow_run_filter=_of_run(flow_run_id), limit=PAGE)


def log_lines(client: SyncPrefectClient, flow_run_id: UUID) -> list[str]:
    logs = client.read_logs(
        log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=PAGE, sort=LogSort.TIMESTAMP_ASC
    )
    return [entry.message for entry in logs]
