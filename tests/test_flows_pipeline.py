"""flows/pipeline.py: the flow body on real Prefect and real DVC, with dvc.yaml's stages made trivial.

Each stage only appends its name to steps.log (one may exit 3 or 1 instead), so these tests cover
what the flow itself does: ingest first, one task per dvc.yaml stage in its order, promotion last,
a gate rejection (a stage exiting 3, or evaluate's recorded floor) ending the run Rejected with
production unchanged, a failure naming the stage, and the run's overrides kept in params.yaml when
it completes and taken back when it fails. The candidate that promotion gates is a hand-built one
(tests/candidate_factory.py).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.states import State
from prefect.testing.utilities import prefect_test_harness

from flows.dvc_repro import StageFailed
from flows.pipeline import RunSummary, training_pipeline
from flows.prefect_tasks import REJECTED, dvc_stages
from tasks.params import load
from tasks.paths import Workspace
from tasks.registry import Registry

from candidate_factory import (
    CLASSES3,
    answers_for,
    answers_images,
    pixel_reader_candidate,
    publish_pixel_reader,
    write_split,
)
from conftest import PROJECT, file_tree
from prefect_queries import task_runs

pytestmark = pytest.mark.integration

STAGES = dvc_stages(Workspace(PROJECT))
OVERRIDES = {
    "data.synthetic.classes": 2,  # ingest really runs: keep the data tiny
    "data.synthetic.train_per_class": 4,
    "data.synthetic.test_per_class": 2,
    "data.image_size": 8,
    "gate.min_accuracy": 0.5,
    "gate.min_class_recall": 0.0,
    "promote.require_provider": "cpu",
}
PY = Path(sys.executable).name  # the flow puts this interpreter's bin/ first on a stage's PATH
# What tasks.entry logs before it exits with a VisionopsError's code.
FAIL = "import sys; print('2026-01-01 00:00:00 visionops ERROR {error}', file=sys.stderr); sys.exit({code})"


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _trivial_stages(ws: Workspace, failing: dict[str, str] | None = None) -> None:
    """dvc.yaml's stages, in order, each appending its name to steps.log; ``failing`` replaces a
    stage's command with one that fails (after logging its name)."""
    stages = {}
    for stage in STAGES:
        step = f"open('steps.log', 'a').write('{stage}\\n'); "
        code = (failing or {}).get(stage, "")
        stages[stage] = {"cmd": f'{PY} -c "{step}{code}"'}
    ws.dvc_yaml.write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))


def _verified_candidate(ws: Workspace, gate_passed: bool = True) -> None:
    """A candidate, its reports and the test split, as if the real stages had just run: right on every image."""
    labels = np.random.default_rng(0).integers(0, 3, 12)
    write_split(ws, answers_images([answers_for(labels, np.ones(12, bool), 3)], 3), labels, CLASSES3)
    pixel_reader_candidate(ws, read_channel=0, gate_passed=gate_passed)


def _run(ws: Workspace) -> State[Any]:
    return training_pipeline(overrides=OVERRIDES, workspace=str(ws.root), return_state=True)


def _steps(ws: Workspace) -> list[str]:
    log = ws.root / "steps.log"
    return log.read_text().split() if log.is_file() else []


def _task_names(state: State[Any]) -> list[str]:
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    with get_client(sync_client=True) as client:
        runs = task_runs(client, flow_run_id)
    return [run.name.rsplit("-", 1)[0] for run in runs]  # "<task name>-<counter>", in start order


def test_ingest_then_one_task_per_stage_in_order_then_promotion(harness: None, workspace: Workspace) -> None:
    _trivial_stages(workspace)
    _verified_candidate(workspace)
    state = _run(workspace)
    assert state.is_completed() and state.name == "Completed", state.message
    summary = state.result()
    assert isinstance(summary, RunSummary) and summary.production_version == 1
    assert list(summary.stage_seconds) == ["ingest", *STAGES, "promote"]
    assert _steps(workspace) == STAGES
    assert _task_names(state) == ["ingest", *STAGES, "promote"]
    assert (workspace.root / "data.dvc").is_file(), "ingest did not version data/"
    kept = load(workspace.params_file)  # a completed run keeps its overrides, as `dvc exp run -S` does
    assert (kept.data.image_size, kept.gate.min_accuracy, kept.promote.require_provider) == (8, 0.5, "cpu")


def test_a_stage_exiting_3_ends_the_run_rejected_and_production_unchanged(
    harness: None, workspace: Workspace, tmp_path: Path
) -> None:
    registry = Registry.open(workspace, load(workspace.params_file).registry)
    publish_pixel_reader(registry, tmp_path / "production", read_channel=0)
    before = file_tree(workspace.root / "registry")
    _trivial_stages(workspace, {"evaluate": FAIL.format(error="GateRejected: accuracy 0.10 < 0.90", code=3)})
    _verified_candidate(workspace)
    state = _run(workspace)
    assert state.is_completed() and state.name == REJECTED
    assert state.message == "evaluate: accuracy 0.10 < 0.90 (production unchanged: version 1)"
    assert _steps(workspace) == STAGES[: STAGES.index("evaluate") + 1]
    assert _task_names(state) == ["ingest", *STAGES[: STAGES.index("evaluate") + 1]]
    assert file_tree(workspace.root / "registry") == before


def test_a_floor_evaluate_recorded_as_failed_lets_dvc_finish_then_ends_rejected_without_promotion(
    harness: None, workspace: Workspace
) -> None:
    _trivial_stages(workspace)
    _verified_candidate(workspace, gate_passed=False)
    state = _run(workspace)
    assert state.is_completed() and state.name == REJECTED
    assert (state.message or "").startswith("evaluate: candidate fails the accuracy floor: accuracy 0.9000 < ")
    assert (state.message or "").endswith("(production unchanged: none yet)")
    assert _steps(workspace) == STAGES, "DVC did not finish the stages after evaluate, as `dvc repro` would"
    assert _task_names(state) == ["ingest", *STAGES]
    registry = Registry.open(workspace, load(workspace.params_file).registry)
    assert registry.production() is None and registry.events().events == [], "an unblessed candidate was promoted"


def test_a_stage_exiting_1_fails_the_run_naming_the_stage(harness: None, workspace: Workspace) -> None:
    _trivial_stages(workspace, {"validate": FAIL.format(error="ValidationFailed: 1 expectation failed", code=1)})
    before = workspace.params_file.read_bytes()
    state = _run(workspace)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, StageFailed) and error.stage == "validate"
    assert str(error) == "stage 'validate' failed: ValidationFailed: 1 expectation failed"
    assert _steps(workspace) == ["prepare", "validate"]
    assert _task_names(state) == ["ingest", "prepare", "validate"]
    # Nothing was promoted; the registry holds only production.json ("none yet"), validate's DVC dependency.
    registry = Registry.open(workspace, load(workspace.params_file).registry)
    assert registry.production() is None and registry.events().events == []
    assert sorted(p.name for p in (workspace.root / "registry").rglob("*") if p.is_file()) == ["production.json"]
    assert workspace.params_file.read_bytes() == before, "a failed run left its overrides in params.yaml"
