"""dvc.yaml is the single definition of the stages: keep it in step with tasks/ and params.yaml."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from tasks import params
from tasks.paths import SPLITS, Workspace

PROJECT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
STAGES = DVC["stages"]
EXPECTED_ORDER = ["prepare", "validate", "train", "evaluate", "export", "verify"]


def _names(entries: list) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries]


def _workspace_paths() -> set[str]:
    ws = Workspace(Path("/ws"))
    found: set[str] = set()
    for name in dir(Workspace):
        attr = getattr(Workspace, name)
        if isinstance(attr, property):
            value = getattr(ws, name)
            if isinstance(value, Path):
                found.add(value.relative_to("/ws").as_posix())
    for split in SPLITS:
        for fn in (ws.images, ws.labels, ws.raw_split):
            found.add(fn(split).relative_to("/ws").as_posix())
    return found


def test_stages_are_the_documented_chain_in_order() -> None:
    assert list(STAGES) == EXPECTED_ORDER


@pytest.mark.parametrize("stage", EXPECTED_ORDER)
def test_stage_runs_its_own_module_and_depends_on_it(stage: str) -> None:
    spec = STAGES[stage]
    assert spec["cmd"] == f"python -m tasks.{stage}"
    assert f"tasks/{stage}.py" in spec["deps"]
    for dep in spec["deps"]:
        if dep.startswith("tasks/"):
            assert (PROJECT / dep).is_file(), f"{stage}: dep {dep} does not exist"


@pytest.mark.parametrize("stage", EXPECTED_ORDER)
def test_stage_params_exist_in_params_yaml(stage: str) -> None:
    p = params.load(PROJECT / "params.yaml")
    for key in STAGES[stage].get("params", []):
        node = p
        for part in key.split("."):
            assert dataclasses.is_dataclass(node) and hasattr(node, part), f"{stage}: unknown param {key}"
            node = getattr(node, part)


@pytest.mark.parametrize("stage", EXPECTED_ORDER)
def test_stage_outputs_are_workspace_paths(stage: str) -> None:
    known = _workspace_paths()
    spec = STAGES[stage]
    for kind in ("outs", "metrics", "plots"):
        for path in _names(spec.get(kind, [])):
            assert path in known, f"{stage}: {kind} {path} is not derived in tasks/paths.py"


def test_evaluate_declares_metrics_json_as_dvc_metrics() -> None:
    assert "reports/metrics.json" in _names(STAGES["evaluate"]["metrics"])
