"""Reading a flow run's task runs, logs and artifacts back from a real Prefect API (test helpers)."""

from __future__ import annotations

from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun, StateType, TaskRun
from prefect.client.schemas.sorting import FlowRunSort, LogSort, TaskRunSort

PAGE = 200  # API rows read at once


def artifact_keys(client: SyncPrefectClient, flow_run_id: UUID) -> set[str]:
    """Keys of the artifacts of a flow run, made in its tasks or in the flow itself."""
    artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])), limit=PAGE
    )
    return {a.key for a in artifacts if a.key}


def task_runs(client: SyncPrefectClient, flow_run_id: UUID) -> list[TaskRun]:
    return client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
        sort=TaskRunSort.EXPECTED_START_TIME_ASC,
        limit=PAGE,
    )


def log_lines(client: SyncPrefectClient, flow_run_id: UUID) -> list[str]:
    logs = client.read_logs(
        log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), sort=LogSort.TIMESTAMP_ASC
    )
    return [entry.message for entry in logs]


def scheduled_runs(client: SyncPrefectClient, deployment_id: UUID) -> list[FlowRun]:
    """Runs the server's scheduler created for a deployment and that have not started yet."""
    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
        sort=FlowRunSort.EXPECTED_START_TIME_ASC,
    )
