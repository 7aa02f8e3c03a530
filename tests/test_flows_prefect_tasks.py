"""DVC stages run through `dvc repro --single-item` in a real git+DVC repo: success, skip, gate, crash."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from prefect.states import Completed, Failed, State

from flows.prefect_tasks import (
    REJECTED,
    StageFailed,
    _transient,
    dvc_stages,
    failure_reason,
    raise_if_rejected,
    run_dvc_stage,
)
from flows.workspace_lock import WorkspaceBusy, workspace_lock
from tasks.data.downloads import TransientDownloadError
from tasks.errors import DataError, GateRejected
from tasks.paths import Workspace

from conftest import PROJECT

ENTRY_ERROR = "import logging, sys; logging.basicConfig(format='%(asctime)s %(name)s %(levelname)s %(message)s');"


def _failing(py: str, error: str, code: int) -> str:
    """A stage command that logs ``error`` as tasks.entry does, then exits ``code``."""
    return f"{py} -c \"{ENTRY_ERROR} logging.getLogger('visionops').error('{error}'); sys.exit({code})\""


def _stage(cmd: str, out: str | None = None) -> dict:
    return {"cmd": cmd, **({"outs": [out]} if out else {})}


@pytest.fixture
def repo(workspace: Workspace) -> Workspace:
    """A git+DVC workspace whose dvc.yaml has one stage per outcome."""
    py = Path(sys.executable).name  # stage_env() puts this interpreter's bin/ first on PATH
    stages = {
        "ok": _stage(f"{py} -c \"open('out.txt', 'w').write('done')\"", "out.txt"),
        "reject": _stage(_failing(py, "GateRejected: accuracy 0.10 < 0.90", 3)),
        "crash": _stage(_failing(py, "DataError: data/train.parquet not found", 1)),
        "traceback": _stage(f"{py} -c \"raise RuntimeError('boom in the stage')\""),
        "slow": _stage(
            f"{py} -c \"import time; open('started', 'w'); time.sleep(4); open('slow.txt', 'w').write('done')\"",
            "slow.txt",
        ),
    }
    workspace.dvc_yaml.write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    return workspace


LOG = logging.getLogger("test_flows_prefect_tasks")


@pytest.mark.integration
def test_a_stage_runs_then_is_skipped_when_up_to_date(repo: Workspace, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOG.name)
    first = run_dvc_stage(repo, "ok", LOG)
    assert first.ran and (repo.root / "out.txt").read_text() == "done"
    assert any("ok | Running stage 'ok'" in r.getMessage() for r in caplog.records)
    assert "ok" in yaml.safe_load((repo.root / "dvc.lock").read_text())["stages"]
    second = run_dvc_stage(repo, "ok", LOG)
    assert not second.ran


@pytest.mark.integration
def test_exit_3_is_a_gate_rejection_with_the_stage_reason(repo: Workspace) -> None:
    with pytest.raises(GateRejected, match=r"^reject: accuracy 0\.10 < 0\.90$"):
        run_dvc_stage(repo, "reject", LOG)


@pytest.mark.integration
def test_a_failure_names_the_stage_and_its_own_error(repo: Workspace) -> None:
    with pytest.raises(StageFailed) as exc:
        run_dvc_stage(repo, "crash", LOG)
    assert str(exc.value) == "stage 'crash' failed: DataError: data/train.parquet not found"
    assert "exited with 1" in exc.value.tail


@pytest.mark.integration
def test_a_crash_without_an_error_record_reports_the_traceback_line(repo: Workspace) -> None:
    with pytest.raises(StageFailed, match=r"stage 'traceback' failed: RuntimeError: boom in the stage"):
        run_dvc_stage(repo, "traceback", LOG)


def test_failure_reason_keeps_a_multi_line_error_and_drops_dvc_lines() -> None:
    lines = [
        "> python -m tasks.validate",
        "2026-01-01 00:00:00,000 visionops ERROR ValidationFailed: 2 expectations failed:",
        "  - label set: unexpected class 'zebra'",
        "  - leak: 3 test images also in train",
        "ERROR: failed to reproduce 'validate': failed to run: python -m tasks.validate, exited with 1",
    ]
    assert failure_reason(lines) == (
        "ValidationFailed: 2 expectations failed:"
        " - label set: unexpected class 'zebra' - leak: 3 test images also in train"
    )


def test_failure_reason_reads_the_one_error_line_of_tasks_entry() -> None:
    lines = [
        "> python -m tasks.validate",
        "2026-01-01 00:00:00,000 tasks.ingest ERROR an earlier log record",
        "visionops: error: ValidationFailed: data validation failed: 1 of 14 checks",
        "- min_per_class: 4 unexpected",
        "ERROR: failed to reproduce 'validate': failed to run: python -m tasks.validate, exited with 1",
    ]
    reason = "ValidationFailed: data validation failed: 1 of 14 checks - min_per_class: 4 unexpected"
    assert failure_reason(lines) == reason


def test_the_flow_runs_the_stages_of_dvc_yaml_in_its_order() -> None:
    assert dvc_stages(Workspace(PROJECT)) == ["prepare", "validate", "train", "evaluate", "export", "verify"]


def test_a_rejected_task_state_becomes_gate_rejected_and_other_results_pass() -> None:
    with pytest.raises(GateRejected, match="accuracy too low"):
        raise_if_rejected(Completed(name=REJECTED, message="accuracy too low"))
    done: State[Any] = Completed()
    assert raise_if_rejected(done) is done
    assert raise_if_rejected(42) == 42


def _retried(exc: Exception) -> bool:
    """Whether Prefect retries the ingest task after ``exc`` (the task and its run are not consulted)."""
    return _transient(cast(Any, None), cast(Any, None), Failed(data=exc))


def test_ingest_retries_only_transient_download_errors() -> None:
    assert _retried(TransientDownloadError("connection reset"))
    assert not _retried(DataError("checksum mismatch"))
    assert not _retried(ValueError("bug"))


RUNNER = """
import logging, sys
from pathlib import Path
from flows.prefect_tasks import run_dvc_stage
from flows.workspace_lock import workspace_lock
from tasks.paths import Workspace
ws = Workspace(Path(sys.argv[1]))
with workspace_lock(ws, "runner", 0, print):
    run_dvc_stage(ws, "slow", logging.getLogger("runner"))
"""


@pytest.mark.integration
def test_a_killed_run_keeps_the_workspace_locked_until_its_stage_has_finished(repo: Workspace) -> None:
    runner = subprocess.Popen([sys.executable, "-c", RUNNER, str(repo.root)])
    try:
        deadline = time.monotonic() + 60
        while not (repo.root / "started").exists():
            assert runner.poll() is None and time.monotonic() < deadline, "the slow stage never started"
            time.sleep(0.1)
    finally:
        runner.kill()
        runner.wait()
    with pytest.raises(WorkspaceBusy), workspace_lock(repo, "too-early", 0, print):
        pass
    with workspace_lock(repo, "after-the-stage", 60, lambda line: None):
        assert (repo.root / "slow.txt").read_text() == "done", "the lock was free while the orphaned stage still ran"
