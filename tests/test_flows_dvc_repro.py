"""One `dvc repro` read stage by stage, in a real git+DVC repo: run, skip, time, gate, crash, stop."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from flows.dvc_repro import DvcRepro, StageFailed, StageRun, failure_reason
from flows.workspace_lock import WorkspaceBusy, workspace_lock
from tasks.errors import GateRejected
from tasks.paths import Workspace

pytestmark = pytest.mark.integration

PY = Path(sys.executable).name  # stage_env() puts this interpreter's bin/ first on PATH
ENTRY_ERROR = "import logging, sys; logging.basicConfig(format='%(asctime)s %(name)s %(levelname)s %(message)s');"
LOG = logging.getLogger("test_flows_dvc_repro")


def _failing(error: str, code: int) -> str:
    """A stage command that logs ``error`` as tasks.entry does, then exits ``code``."""
    return f"{PY} -c \"{ENTRY_ERROR} logging.getLogger('visionops').error('{error}'); sys.exit({code})\""


def _writes(name: str, seconds: float = 0, dep: str | None = None) -> dict:
    code = f"import time; open('{name}.started', 'w'); time.sleep({seconds}); open('{name}.txt', 'w').write('done')"
    return {"cmd": f'{PY} -c "{code}"', **({"deps": [dep]} if dep else {}), "outs": [f"{name}.txt"]}


@pytest.fixture
def repo(workspace: Workspace) -> Workspace:
    """A chain first -> second, and stages for each way a stage can end."""
    stages = {
        "first": _writes("first"),
        "second": _writes("second", seconds=2, dep="first.txt"),
        "reject": {"cmd": _failing("GateRejected: accuracy 0.10 < 0.90", 3)},
        "crash": {"cmd": _failing("DataError: data/train.parquet not found", 1)},
        "traceback": {"cmd": f"{PY} -c \"raise RuntimeError('boom in the stage')\""},
        "slow": _writes("slow", seconds=6),
        "broken": {"cmd": f"{PY} -c pass", "deps": ["missing.txt"]},
    }
    workspace.dvc_yaml.write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    return workspace


def _walk(ws: Workspace, *targets: str) -> Iterator[StageRun]:
    with DvcRepro.start(ws, *targets) as repro:
        while (stage := repro.next_stage()) is not None:
            yield repro.finish_stage(stage, LOG)


def test_each_stage_is_announced_run_then_skipped_when_up_to_date(
    repo: Workspace, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOG.name)
    first = list(_walk(repo, "second"))
    assert [(r.stage, r.ran) for r in first] == [("first", True), ("second", True)]
    assert (repo.root / "second.txt").read_text() == "done"
    assert {"first", "second"} <= set(yaml.safe_load((repo.root / "dvc.lock").read_text())["stages"])
    messages = [r.getMessage() for r in caplog.records]
    assert "first | Running stage 'first':" in messages and "second | Running stage 'second':" in messages
    again = list(_walk(repo, "second"))
    assert [(r.stage, r.ran) for r in again] == [("first", False), ("second", False)]


def test_a_stage_is_timed_when_its_lines_arrive_not_when_the_flow_reads_them(repo: Workspace) -> None:
    busy_s = 8.0  # the flow, busy elsewhere, reads the second stage's lines this much after they came
    with DvcRepro.start(repo, "second") as repro:
        assert repro.next_stage() == "first"
        while not (repo.root / "second.txt").exists():
            time.sleep(0.2)
        time.sleep(busy_s)
        repro.finish_stage("first", LOG)
        second = repro.finish_stage("second", LOG)
        assert repro.next_stage() is None
    assert 2.0 <= second.seconds < busy_s, second


def test_exit_3_is_a_gate_rejection_with_the_stage_reason(repo: Workspace) -> None:
    with pytest.raises(GateRejected, match=r"^reject: accuracy 0\.10 < 0\.90$"):
        list(_walk(repo, "reject"))


def test_a_failure_names_the_stage_and_its_own_error(repo: Workspace) -> None:
    with pytest.raises(StageFailed) as exc:
        list(_walk(repo, "crash"))
    assert str(exc.value) == "stage 'crash' failed: DataError: data/train.parquet not found"
    assert "exited with 1" in exc.value.tail


def test_a_crash_without_an_error_record_reports_the_traceback_line(repo: Workspace) -> None:
    with pytest.raises(StageFailed, match=r"stage 'traceback' failed: RuntimeError: boom in the stage"):
        list(_walk(repo, "traceback"))


def test_dvc_failing_before_any_stage_is_reported_as_dvc_s_error(repo: Workspace) -> None:
    with pytest.raises(StageFailed, match=r"stage 'dvc repro' failed: .*missing\.txt"):
        list(_walk(repo, "broken"))


def test_leaving_early_stops_dvc_and_the_running_stage(repo: Workspace) -> None:
    with pytest.raises(KeyboardInterrupt), DvcRepro.start(repo, "slow") as repro:
        assert repro.next_stage() == "slow"
        while not (repo.root / "slow.started").exists():
            time.sleep(0.1)
        raise KeyboardInterrupt  # a cancelled or interrupted flow run
    time.sleep(7)  # longer than the stage would have taken
    assert not (repo.root / "slow.txt").exists(), "the stage went on after its run was stopped"


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


RUNNER = """
import logging, sys
from pathlib import Path
from flows.dvc_repro import DvcRepro
from flows.workspace_lock import workspace_lock
from tasks.paths import Workspace
ws = Workspace(Path(sys.argv[1]))
with workspace_lock(ws, "runner", 0, print), DvcRepro.start(ws, "slow") as repro:
    repro.finish_stage("slow", logging.getLogger("runner"))
"""


def test_a_killed_run_keeps_the_workspace_locked_until_its_stage_has_finished(repo: Workspace) -> None:
    runner = subprocess.Popen([sys.executable, "-c", RUNNER, str(repo.root)])
    try:
        deadline = time.monotonic() + 60
        while not (repo.root / "slow.started").exists():
            assert runner.poll() is None and time.monotonic() < deadline, "the slow stage never started"
            time.sleep(0.1)
    finally:
        runner.kill()
        runner.wait()
    with pytest.raises(WorkspaceBusy), workspace_lock(repo, "too-early", 0, print):
        pass
    with workspace_lock(repo, "after-the-stage", 60, lambda line: None):
        assert (repo.root / "slow.txt").read_text() == "done", "the lock was free while the orphaned stage still ran"
