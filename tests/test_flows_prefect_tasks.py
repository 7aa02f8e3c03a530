"""The pipeline's Prefect tasks, apart from Prefect: stage order, rejections, retries, the gate verdict."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
from prefect.states import Completed, Failed, State

from flows.prefect_tasks import (
    REJECTED,
    _transient,
    dvc_stages,
    gate_verdict,
    raise_if_rejected,
)
from tasks.data.downloads import TransientDownloadError
from tasks.errors import DataError, GateRejected
from tasks.paths import Workspace

from candidate_factory import metrics_report
from conftest import PROJECT


def test_the_flow_runs_the_stages_of_dvc_yaml_in_its_order() -> None:
    assert dvc_stages(Workspace(PROJECT)) == ["prepare", "validate", "train", "evaluate", "export", "verify"]


def test_a_rejected_task_state_becomes_gate_rejected_and_other_results_pass() -> None:
    with pytest.raises(GateRejected, match="accuracy too low"):
        raise_if_rejected(Completed(name=REJECTED, message="accuracy too low"))
    done: State[Any] = Completed()
    assert raise_if_rejected(done) is done
    assert raise_if_rejected(42) == 42


def test_the_floor_verdict_evaluate_recorded_is_a_rejection_after_evaluate_only(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    metrics_report(0.4, "sha", ["a", "b"], passed=False).write(ws.metrics)
    verdict = gate_verdict(ws, "evaluate")
    assert isinstance(verdict, GateRejected)
    assert str(verdict).startswith("evaluate: candidate fails the accuracy floor: accuracy 0.4000 < gate.min_accuracy")
    assert gate_verdict(ws, "export") is None
    metrics_report(0.9, "sha", ["a", "b"], passed=True).write(ws.metrics)
    assert gate_verdict(ws, "evaluate") is None


def _retried(exc: Exception) -> bool:
    """Whether Prefect retries the ingest task after ``exc`` (the task and its run are not consulted)."""
    return _transient(cast(Any, None), cast(Any, None), Failed(data=exc))


def test_ingest_retries_only_transient_download_errors() -> None:
    assert _retried(TransientDownloadError("connection reset"))
    assert not _retried(DataError("checksum mismatch"))
    assert not _retried(ValueError("bug"))
