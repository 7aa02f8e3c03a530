"""The Prefect flow ``training-pipeline``: ingest, the dvc.yaml stages through DVC, promotion.

A gate rejection is not a crash: the run ends in a Completed state named ``Rejected`` whose
message says why, and production is unchanged. Anything else that goes wrong fails the run with
the stage and its error.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed, State

from flows import artifacts
from flows.dvc_repro import DvcRepro, StageRun
from flows.overrides import check_overrides, overrides_in_force
from flows.prefect_tasks import (
    REJECTED,
    dvc_stage,
    ingest_data,
    promote_candidate,
    raise_if_rejected,
)
from flows.stage_server import warm_stage_server
from flows.workspace_lock import workspace_lock
from tasks.errors import GateRejected
from tasks.params import Params
from tasks.paths import Workspace

if TYPE_CHECKING:
    from tasks.registry.status import RegistryStatus

FLOW_NAME = "training-pipeline"


@dataclass(frozen=True)
class RunSummary:
    """What a completed (not rejected) run returns: production after it, and where the time went."""

    production_version: int | None
    model_path: str | None
    stage_seconds: dict[str, float]  # per pipeline step; a DVC stage's from DVC reaching it to reaching the next
    flow_seconds: float  # the whole run, lock wait excluded


def production_status(ws: Workspace, params: Params) -> RegistryStatus:
    from tasks.registry import Registry

    return Registry.open(ws, params.registry).status()


def declare_production(ws: Workspace, params: Params) -> None:
    """Make sure the registry's production.json exists: validate's DVC dependency (drift)."""
    from tasks.registry import Registry

    Registry.open(ws, params.registry).ensure_marker()


def _production_version(status: RegistryStatus) -> int | None:
    return None if status.production is None else status.production.version


@flow(name=FLOW_NAME, description="Ingest, validate, train, evaluate, export, verify and promote, through DVC.")
def training_pipeline(overrides: dict[str, Any] | None = None, workspace: str | None = None) -> RunSummary | State:
    """Run the pipeline in ``workspace`` (default: the current directory).

    ``overrides`` maps dotted params.yaml keys to values, as ``dvc exp run -S`` does: they are
    validated first, then written into params.yaml; they stay when the run completes (so ``dvc
    repro`` afterwards agrees) and are taken back when it fails.
    """
    log = get_run_logger()
    ws = Workspace(Path(workspace).resolve() if workspace else Path.cwd())
    overrides = dict(overrides or {})
    preview = check_overrides(ws, overrides)
    holder = f"flow run {flow_run.name} ({flow_run.id})"
    with (
        workspace_lock(ws, holder, preview.schedule.lock_timeout_s, on_wait=log.warning),
        overrides_in_force(ws, overrides) as params,
    ):
        started = time.monotonic()  # time waiting for the lock is not the pipeline's
        before = _production_version(production_status(ws, params))
        declare_production(ws, params)
        clock = StageClock()
        try:
            with warm_stage_server(ws, warn=log.warning) as stages_env:  # warms up while ingest works
                clock.measure("ingest", ingest_data, ws, params)
                run_dvc_stages(ws, clock, stages_env)  # prepare, validate, train, evaluate, export, verify
            clock.measure("promote", promote_candidate, ws, params)
        except GateRejected as exc:
            # The rejection path: evaluate records a failed floor, or a stage exits 3, or promote refuses
            # -> that task ends in a Completed state named Rejected -> StageClock.measure raises
            # GateRejected here -> the flow returns a Completed state named Rejected -> `visionops run`
            # exits 3 (pipeline_exit_code).
            artifacts.publish_production(production_status(ws, params), changed=False)
            clock.report(log, time.monotonic() - started)
            unchanged = "none yet" if before is None else f"version {before}"
            log.warning("candidate rejected: %s; production unchanged: %s", exc, unchanged)
            return Completed(name=REJECTED, message=f"{exc} (production unchanged: {unchanged})")
        status = production_status(ws, params)
        artifacts.publish_production(status, changed=_production_version(status) != before)
    production = status.production
    return RunSummary(
        production_version=None if production is None else production.version,
        model_path=None if production is None else production.model_path,
        stage_seconds=clock.seconds,
        flow_seconds=clock.report(log, time.monotonic() - started),
    )


def run_dvc_stages(ws: Workspace, clock: StageClock, env: Mapping[str, str]) -> None:
    """Every dvc.yaml stage, in one ``dvc repro``, one task each as DVC reaches it.

    ``env`` goes to DVC and its stages (the warm stage server's socket). A candidate that evaluate
    records as failing the floor does not stop DVC: the remaining stages run as they would under
    ``dvc repro`` (so dvc.lock is complete and ``dvc exp show`` can compare it), and the rejection
    is raised once DVC is done, before promotion.
    """
    rejection: GateRejected | None = None
    with DvcRepro.start(ws, env=env) as repro:
        while (stage := repro.next_stage()) is not None:
            try:
                clock.measure(stage, dvc_stage.with_options(name=stage), repro, stage)
            except GateRejected as exc:
                rejection = rejection or exc
    if rejection is not None:
        raise rejection


class StageClock:
    """Wall time per pipeline step; a DVC stage counts its time in DVC (flows/dvc_repro.py), not Prefect's."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def measure(self, name: str, step: Any, *args: Any) -> Any:
        started = time.monotonic()
        result = step(*args)
        self.seconds[name] = result.seconds if isinstance(result, StageRun) else time.monotonic() - started
        return raise_if_rejected(result)

    def report(self, log: Any, wall_s: float) -> float:
        """Log where ``wall_s`` went: stage processes vs. orchestration; returns ``wall_s``."""
        in_steps = sum(self.seconds.values())
        log.info(
            "pipeline took %.1f s: %.1f s in its steps (%s), %.1f s (%.0f%%) orchestration",
            wall_s,
            in_steps,
            ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items()),
            wall_s - in_steps,
            100 * (wall_s - in_steps) / wall_s if wall_s else 0.0,
        )
        return wall_s
