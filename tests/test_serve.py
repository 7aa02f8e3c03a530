"""`visionops serve` and every Prefect command README shows, against a real `prefect server start`
on a loopback port: the deployment and its cron come from params.yaml, the server schedules runs
from it, a triggered run with overrides completes and promotes, two runs triggered together never
work in the workspace at once, a failed run puts params.yaml back, the CLI lists and inspects what
the runs left, prefect.yaml deploys to a work pool whose worker runs the flow, and `serve` keeps
running runs after the server restarts."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID
from zoneinfo import ZoneInfo

import pytest
import yaml
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.flows import load_flow_from_entrypoint
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.artifacts import (
    GATE_KEY,
    METRICS_KEY,
    PRODUCTION_KEY,
    VALIDATION_KEY,
    VERIFICATION_KEY,
)
from flows.prefect_tasks import dvc_stages
from flows.serve import check_schedule
from tasks.params import ConfigError, load, write_overrides
from tasks.paths import Workspace

from conftest import PROJECT, copy_workspace, run
from prefect_queries import artifact_keys, log_lines, scheduled_runs, task_runs

STAGES = dvc_stages(Workspace(PROJECT))
CRON, TIMEZONE, DEPLOYMENT = "17 4 * * 1", "Europe/Berlin", "weekly-test"  # not the defaults: read from params.yaml
OVERRIDES = {
    "data.source": "synthetic",
    "train.epochs": 1,
    "data.synthetic.classes": 4,
    "data.synthetic.train_per_class": 40,
    "data.synthetic.test_per_class": 12,
    "data.image_size": 16,
    "gate.min_accuracy": 0.0,
    "validate.drift.min_estimated_accuracy": 0.0,  # below the floor: the second run re-validates against run 1's model
    "verify.provider": "cpu",
    "verify.latency_runs": 5,
    "registry.max_batch_size": 16,
    "promote.require_provider": "cpu",
}
STARTUP_S = 180  # server migrations and first imports on a loaded 2-core machine
RUN_S = 600  # both triggered runs, one after the other
SCHEDULER_S = 60  # the server's scheduler loop runs every 5 s here (PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS)


@dataclass
class Served:
    ws: Workspace
    env: dict[str, str]
    api_url: str
    server: subprocess.Popen
    serve_log: Path
    restart_server: Callable[[], subprocess.Popen]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, sig: int = signal.SIGINT) -> None:
    """Stop a process we started, with the children in its session (flow runs, stages)."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_for(what: str, ready, proc: subprocess.Popen, log: Path, timeout: float = STARTUP_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        if (result := ready()) is not None:
            return result
        time.sleep(1)
    pytest.fail(f"{what} not ready after {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def served(workspace_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("serve")
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(root / "prefect-home"),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",  # s; pick triggered runs up quickly
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
    }
    server_log = root / "server.log"

    def start_server() -> subprocess.Popen:
        return subprocess.Popen(
            ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
            env=env, stdout=server_log.open("a"), stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    server = start_server()
    serve = None
    served: Served | None = None
    try:
        _wait_for("prefect server", lambda: _healthy(api_url), server, server_log)
        ws = copy_workspace(workspace_template, root / "ws", root / "dvc-remote")
        write_overrides(
            ws.params_file, {"schedule.cron": CRON, "schedule.timezone": TIMEZONE, "schedule.deployment": DEPLOYMENT}
        )
        serve_log = root / "serve.log"
        serve = subprocess.Popen(
            ["visionops", "serve"], cwd=ws.root, env=env, stdout=serve_log.open("w"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            with get_client(sync_client=True) as client:
                _wait_for("visionops serve", lambda: _deployment(client), serve, serve_log)
            served = Served(ws, env, api_url, server, serve_log, start_server)
            yield served
    finally:
        if serve is not None:
            _stop(serve)
        _stop(served.server if served is not None else server, signal.SIGTERM)


def _healthy(api_url: str) -> bool | None:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return True if response.status == 200 else None
    except OSError:
        return None


def _deployment(client: SyncPrefectClient):
    try:
        return client.read_deployment_by_name(f"training-pipeline/{DEPLOYMENT}")
    except ObjectNotFound:  # until serve has registered it
        return None


@pytest.mark.slow
def test_serve_registers_the_deployment_with_the_cron_from_params_yaml(served: Served) -> None:
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(f"training-pipeline/{DEPLOYMENT}")
    (schedule,) = deployment.schedules
    assert isinstance(schedule.schedule, CronSchedule), schedule.schedule
    assert schedule.schedule.cron == CRON and schedule.schedule.timezone == TIMEZONE and schedule.active
    assert deployment.parameters == {"workspace": str(served.ws.root)}
    assert deployment.parameter_openapi_schema is not None
    assert "overrides" in deployment.parameter_openapi_schema["properties"]


@pytest.mark.slow
def test_the_server_schedules_runs_from_that_cron(served: Served) -> None:
    deadline = time.monotonic() + SCHEDULER_S
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(f"training-pipeline/{DEPLOYMENT}")
        while not (scheduled := scheduled_runs(client, deployment.id)) and time.monotonic() < deadline:
            time.sleep(2)
    assert scheduled, f"the server's scheduler created no run from {CRON!r} in {SCHEDULER_S} s (see server.log)"
    berlin = ZoneInfo(TIMEZONE)
    for flow_run in scheduled:
        assert flow_run.expected_start_time is not None
        start = flow_run.expected_start_time.astimezone(berlin)
        assert (start.weekday(), start.hour, start.minute) == (0, 4, 17), start


def _wait_final(client: SyncPrefectClient, flow_run_id: UUID, deadline: float) -> FlowRun:
    while time.monotonic() < deadline:
        flow_run = client.read_flow_run(flow_run_id)
        if flow_run.state is not None and flow_run.state.is_final():
            return flow_run
        time.sleep(2)
    pytest.fail(f"flow run {flow_run_id} did not finish in {RUN_S} s")


def _span(client: SyncPrefectClient, flow_run_id: UUID) -> tuple[float, float]:
    """When the run worked in the workspace: from its first task run's start to its last one's end."""
    runs = task_runs(client, flow_run_id)
    assert runs, f"flow run {flow_run_id} ran no tasks"
    starts = [t.start_time.timestamp() for t in runs if t.start_time is not None]
    ends = [t.end_time.timestamp() for t in runs if t.end_time is not None]
    assert len(starts) == len(ends) == len(runs), f"flow run {flow_run_id} has a task run that never started or ended"
    return min(starts), max(ends)


@pytest.mark.slow
def test_two_triggered_runs_complete_promote_and_never_overlap(served: Served) -> None:
    # Exactly what a user types; the second run is triggered from Python at the same moment.
    proc = run(
        [
            "prefect", "deployment", "run", f"training-pipeline/{DEPLOYMENT}",
            "--params", json.dumps({"overrides": OVERRIDES}),
        ],
        served.ws.root, env=served.env,
    )  # fmt: skip
    printed = re.search(r"UUID: ([0-9a-f-]{36})", proc.stdout)
    assert printed, proc.stdout
    first = UUID(printed.group(1))
    triggered = run_deployment(f"training-pipeline/{DEPLOYMENT}", parameters={"overrides": OVERRIDES}, timeout=0)
    assert isinstance(triggered, FlowRun)
    second = triggered.id
    deadline = time.monotonic() + RUN_S
    with get_client(sync_client=True) as client:
        finished = {i: _wait_final(client, i, deadline) for i in (first, second)}
        for flow_run in finished.values():
            state = flow_run.state
            assert state is not None and state.type.value == "COMPLETED", (state, log_lines(client, flow_run.id)[-20:])
        spans = sorted((_span(client, i), i) for i in finished)
        (_, earlier_end), earlier = spans[0]
        (later_start, _), later = spans[1]
        assert earlier_end <= later_start, f"two runs worked in the workspace at once: {spans}"
        assert any("waiting for the workspace lock" in line for line in log_lines(client, later))
        keys = artifact_keys(client, earlier)
    assert {VALIDATION_KEY, METRICS_KEY, GATE_KEY, VERIFICATION_KEY, PRODUCTION_KEY} <= keys
    status = json.loads(run(["visionops", "status", "--json"], served.ws.root).stdout)
    assert status["production"]["version"] == 1
    assert load(served.ws.params_file).train.epochs == 1, "the run's overrides were not written to params.yaml"


def test_a_bad_cron_or_timezone_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^schedule\.cron: '61 3 \* \* \*' is not a valid"):
        check_schedule("61 3 * * *", "UTC")
    with pytest.raises(ConfigError, match=r"^schedule\.timezone: 'Mars/Olympus' is not a valid"):
        check_schedule("0 3 * * *", "Mars/Olympus")
    check_schedule(CRON, TIMEZONE)


def test_prefect_yaml_deploys_the_same_flow_on_the_schedule_of_params_yaml() -> None:
    config = yaml.safe_load((PROJECT / "prefect.yaml").read_text())
    schedule = load(PROJECT / "params.yaml").schedule
    (deployment,) = [d for d in config["deployments"] if d["name"] == schedule.deployment]
    (cron,) = deployment["schedules"]
    assert (cron["cron"], cron["timezone"]) == (schedule.cron, schedule.timezone)
    assert load_flow_from_entrypoint(str(PROJECT / deployment["entrypoint"])).name == "training-pipeline"
    assert deployment["work_pool"]["name"] and deployment["concurrency_limit"] == 1


def _ended_run(overrides: dict[str, object], timeout_s: float) -> FlowRun:
    """A run of the served deployment, triggered from Python, once it has ended."""
    triggered = run_deployment(f"training-pipeline/{DEPLOYMENT}", parameters={"overrides": overrides}, timeout=0)
    assert isinstance(triggered, FlowRun)
    with get_client(sync_client=True) as client:
        return _wait_final(client, triggered.id, time.monotonic() + timeout_s)


@pytest.mark.slow
def test_a_triggered_run_with_a_typo_fails_naming_the_key_before_touching_anything(served: Served) -> None:
    before = served.ws.params_file.read_bytes()
    state = _ended_run({"train.epoch": 1}, STARTUP_S).state
    assert state is not None and state.type.value == "FAILED"
    assert "unknown key train.epoch" in (state.message or "")
    assert served.ws.params_file.read_bytes() == before


def _prefect(served: Served, *args: str) -> str:
    """A Prefect CLI command as README shows it, against the test's server; its output."""
    env = {**served.env, "COLUMNS": "250"}  # table cells unwrapped
    proc = run(["prefect", *args], served.ws.root, env=env, stdin=subprocess.DEVNULL)
    # the 422s of issue 11 (FastAPI 0.151 rejecting Prefect's explicit nulls); "422" alone can be part of an ID
    assert "Unprocessable" not in proc.stdout + proc.stderr and "422 " not in proc.stderr, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_the_prefect_commands_readme_shows_list_and_inspect_what_the_runs_left(served: Served) -> None:
    assert f"training-pipeline/{DEPLOYMENT}" in _prefect(served, "deployment", "ls")
    assert "COMPLETED" in _prefect(served, "flow-run", "ls")
    listed = _prefect(served, "artifact", "ls")
    assert all(key in listed for key in (GATE_KEY, METRICS_KEY, VERIFICATION_KEY, PRODUCTION_KEY)), listed
    inspected = _prefect(served, "artifact", "inspect", GATE_KEY)
    assert "## Promotion decision: " in inspected, inspected


@pytest.mark.slow
def test_prefect_yaml_deploys_to_a_work_pool_whose_worker_runs_the_flow(served: Served) -> None:
    # README's "A work pool instead of serve", in a checkout of this project: the same commands.
    shutil.copytree(PROJECT / "flows", served.ws.root / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(PROJECT / "prefect.yaml", served.ws.root / "prefect.yaml")
    pool = Served(**{**served.__dict__, "env": {**served.env, "VISIONOPS_WORKSPACE": str(served.ws.root)}})
    _prefect(pool, "work-pool", "create", "visionops-local", "--type", "process")
    _prefect(pool, "deploy", "--name", "nightly")
    params = json.dumps({"overrides": OVERRIDES})
    triggered = _prefect(pool, "deployment", "run", "training-pipeline/nightly", "--params", params)
    printed = re.search(r"UUID: ([0-9a-f-]{36})", triggered)
    assert printed, triggered
    _prefect(pool, "worker", "start", "--pool", "visionops-local", "--run-once")
    with get_client(sync_client=True) as client:
        flow_run = _wait_final(client, UUID(printed.group(1)), time.monotonic() + RUN_S)
        state = flow_run.state
        assert state is not None and state.type.value == "COMPLETED", (state, log_lines(client, flow_run.id)[-20:])
        names = [t.name.rsplit("-", 1)[0] for t in task_runs(client, flow_run.id)]
    assert names[: len(STAGES) + 1] == ["ingest", *STAGES], names


@pytest.mark.slow
def test_a_triggered_run_that_fails_puts_params_yaml_back(served: Served) -> None:
    before = served.ws.params_file.read_bytes()
    state = _ended_run({"data.source": "/nonexistent/images", "train.epochs": 2}, RUN_S).state
    assert state is not None and state.type.value == "FAILED"
    assert "data source /nonexistent/images not found" in (state.message or "")
    assert served.ws.params_file.read_bytes() == before, "the failed run left its overrides in params.yaml"


@pytest.mark.slow
def test_serve_goes_on_running_runs_after_the_server_restarts(served: Served) -> None:
    _stop(served.server, signal.SIGTERM)
    served.server = served.restart_server()
    _wait_for("restarted prefect server", lambda: _healthy(served.api_url), served.server, served.serve_log)
    time.sleep(15)  # the runner's cancellation observer polls while its websocket reconnects
    state = _ended_run({"train.epoch": 1}, STARTUP_S).state
    assert state is not None and state.type.value == "FAILED"  # picked up and run by serve
    assert "unknown key train.epoch" in (state.message or "")
    assert "cancellation will fail" not in served.serve_log.read_text()
