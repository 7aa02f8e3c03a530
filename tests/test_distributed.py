"""Data-parallel training (tasks/training/distributed.py) with real torch.distributed: gloo, 2 processes.

The unit tier checks the parameters and the arithmetic of shares; the integration tests run the
real stage (`python -m tasks.train` as the elastic agent of its workers), and the slow ones the
flow (`visionops run`) and two one-process nodes meeting at a c10d rendezvous on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_train import run as train_in_process
from test_train import tiny, write_prepared

from tasks import params
from tasks.blessing.evidence import Card
from tasks.blessing.reports import TrainReport
from tasks.data.prepared import PreparedData
from tasks.params import ConfigError
from tasks.paths import Workspace
from tasks.registry import Registry
from tasks.training import loop
from tasks.training.candidate import load_candidate
from tasks.training.distributed import RUN_ID, Topology
from tasks.training.models import build_model
from tasks.training.optim import Schedule
from tasks.training.sampler import EpochSampler
from tasks.training.splits import DeviceSplit, Preprocess

from conftest import copy_workspace, run

PROJECT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- unit tier


def test_nproc_per_node_is_auto_or_a_count_and_a_bad_value_names_the_key() -> None:
    raw = params.read_raw(PROJECT / "params.yaml")
    assert params.parse(params.apply_overrides(raw, {"train.nproc_per_node": "auto"})).train.nproc_per_node == "auto"
    assert params.parse(params.apply_overrides(raw, {"train.nproc_per_node": 8})).train.nproc_per_node == 8
    for key, bad in (
        ("train.nproc_per_node", "all"),
        ("train.nproc_per_node", 0),
        ("train.nnodes", 0),
        ("train.rdzv_endpoint", "node0"),
        ("train.rdzv_timeout_s", 0),
    ):
        with pytest.raises(ConfigError, match=re.escape(key)):
            params.parse(params.apply_overrides(raw, {key: bad}))


def test_the_topology_resolves_auto_and_refuses_what_cannot_run() -> None:
    assert Topology.of(tiny(nproc_per_node="auto"), cuda=False).world_size == 1  # auto on the CPU: one process
    assert Topology.of(tiny(nproc_per_node=2, nnodes=3, batch_size=48), cuda=False).world_size == 6
    with pytest.raises(ConfigError, match=r"train\.batch_size: the global batch 50 does not split evenly over 4"):
        Topology.of(tiny(nproc_per_node=4, batch_size=50), cuda=False)
    with pytest.raises(ConfigError, match=r"train\.sync_batchnorm"):
        Topology.of(tiny(nproc_per_node=2, sync_batchnorm=True), cuda=False)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"train\.nproc_per_node: 2 processes need 2 GPUs, torch sees 0"):
            Topology.of(tiny(nproc_per_node=2), cuda=True)


def test_the_small_dataset_cap_applies_to_the_global_batch_in_equal_shares() -> None:
    t = tiny(batch_size=512, min_steps_per_epoch=50, lr=0.4)
    one, three = Schedule.for_dataset(t, 1000, 1), Schedule.for_dataset(t, 1000, 3)
    assert one.batch_size == 20  # 1000 images / 50 steps
    assert three.batch_size == 18  # the same cap, rounded down to 3 equal shares of 6
    assert three.peak_lr == pytest.approx(0.4 * 18 / 512)  # lr per 512 images of the global batch


def test_each_rank_gets_its_own_share_of_every_global_batch_reshuffled_each_epoch() -> None:
    def epoch(e: int, rank: int, world: int) -> list[torch.Tensor]:
        return EpochSampler(40, 8, rank, world).batches(torch.Generator().manual_seed(e))

    for e in (1, 2):
        whole = epoch(e, 0, 1)
        shares = [epoch(e, r, 2) for r in (0, 1)]
        for step, batch in enumerate(whole):
            assert torch.equal(torch.cat([shares[0][step], shares[1][step]]), batch)
        assert not set(torch.cat(shares[0]).tolist()) & set(torch.cat(shares[1]).tolist())
    assert not torch.equal(torch.cat(epoch(1, 0, 2)), torch.cat(epoch(2, 0, 2)))


# ---------------------------------------------------------------- the stage, 2 processes on gloo


def _stage_workspace(root: Path, **train: Any) -> Workspace:
    """Tiny prepared data and a params.yaml whose train section is ``tiny(**train)``."""
    ws = Workspace(root)
    write_prepared(ws)
    raw = params.read_raw(PROJECT / "params.yaml")
    raw["train"] = dataclasses.asdict(tiny(**train))
    raw["model"] = {"arch": "resnet18", "stem": "cifar", "weights": "none", "normalization": "data"}
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return ws


def _stage(ws: Workspace) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tasks.train"], cwd=ws.root, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


def _single_process_accuracy(ws: Workspace) -> float:
    """The candidate's test accuracy scored by one process, at a batch size of its own."""
    candidate = load_candidate(ws.candidate)
    model = build_model(candidate.arch, candidate.stem, candidate.num_classes, candidate.in_channels)
    model.load_state_dict(candidate.state_dict)
    norm = candidate.normalization
    split = DeviceSplit.load(
        PreparedData.load(ws).test, Preprocess.on(torch.device("cpu"), norm["mean"], norm["std"], 1.0),
        torch.device("cpu"),
    )
    return loop.test_accuracy(model, split, 5)


# No batch statistics in the trained part (frozen backbone: its BatchNorm stays in eval mode) and no
# augmentation (each rank draws its own): the rest must match the single process within float error.
_COMPARABLE = {"freeze": "backbone", "augment": dataclasses.replace(tiny().augment, crop_padding=0, flip=False)}


@pytest.mark.integration
@pytest.mark.usefixtures("single_thread_torch")
def test_two_ranks_and_one_give_the_same_weights_and_the_same_test_accuracy(tmp_path: Path) -> None:
    two = _stage_workspace(tmp_path / "two", nproc_per_node=2, epochs=2, **_COMPARABLE)
    proc = _stage(two)
    one = _stage_workspace(tmp_path / "one", epochs=2, **_COMPARABLE)
    single = train_in_process(tiny(epochs=2, **_COMPARABLE), one)  # while the two ranks start
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output

    report = TrainReport.read(two.train_summary, "train")
    assert (report.world_size, report.backend, report.batch_size, report.per_rank_batch_size) == (2, "gloo", 16, 8)
    assert (single.world_size, single.backend, single.batch_size) == (1, "none", 16)
    expected, actual = load_candidate(one.candidate).state_dict, load_candidate(two.candidate).state_dict
    torch.manual_seed(0)  # train.seed: the initial weights
    initial = build_model("resnet18", "cifar", 4, 1).state_dict()
    assert not torch.equal(expected["fc.weight"], initial["fc.weight"])  # trained weights are compared
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    assert report.test_accuracy == _single_process_accuracy(two)
    assert report.train_loss == pytest.approx(single.train_loss, rel=1e-5)


def _rank_pid(ws: Workspace, rank: int) -> int | None:
    """The pid of ``rank``'s worker process of the stage running in ``ws``, if it is up."""
    wanted = {f"TORCHELASTIC_RUN_ID={RUN_ID}", f"RANK={rank}"}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if Path(os.readlink(entry / "cwd")) == ws.root and wanted <= set(
                (entry / "environ").read_bytes().decode(errors="replace").split("\0")
            ):
                return int(entry.name)
    return None


@pytest.mark.integration
@pytest.mark.usefixtures("single_thread_torch")
def test_a_killed_rank_fails_the_stage_naming_it_and_a_rerun_at_another_world_size_resumes(tmp_path: Path) -> None:
    ws = _stage_workspace(tmp_path / "ws", nproc_per_node=2, epochs=4)
    checkpoint = ws.checkpoints / "train.pt"
    proc = _stage(ws)
    deadline = time.monotonic() + 600
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    victim = _rank_pid(ws, 1)
    assert victim is not None and checkpoint.exists(), proc.communicate(timeout=60)[0]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    output, _ = proc.communicate(timeout=120)
    seconds_to_fail = time.monotonic() - killed_at

    assert proc.returncode == 1, output
    assert "visionops: error: RankFailed: data-parallel training failed: rank 1 (local rank 1 on" in output, output
    assert "was killed by SIGKILL" in output, output
    assert seconds_to_fail < 60, f"the stage took {seconds_to_fail:.0f} s to fail after the kill"
    assert not ws.candidate.exists()
    last_complete = int(torch.load(checkpoint, weights_only=True)["epoch"])
    assert 1 <= last_complete < 4

    # The rerun resumes rank 0's checkpoint of world size 2 in a single process.
    resumed = train_in_process(tiny(epochs=4), ws)
    assert resumed.resumed_from_epoch == last_complete
    assert resumed.world_size == 1 and ws.candidate.exists()


@pytest.mark.integration
def test_a_rendezvous_that_never_completes_fails_after_its_timeout_naming_endpoint_and_nodes(tmp_path: Path) -> None:
    port = _free_port()
    ws = _stage_workspace(tmp_path / "ws", nnodes=2, rdzv_endpoint=f"127.0.0.1:{port}", rdzv_timeout_s=3.0)
    started = time.monotonic()
    output, _ = _stage(ws).communicate(timeout=300)
    assert "visionops: error: RuntimeUnavailable: " in output and f"127.0.0.1:{port}" in output, output
    assert "did not gather the 2 nodes of train.nnodes within 3 s" in output, output
    assert time.monotonic() - started < 120
    assert not ws.candidate.exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- the flow, and two nodes


@pytest.fixture(scope="module")
def flow_ws(workspace_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Workspace, str]]:
    """A workspace sized for 2 cores (synthetic data, CPU verification, no regression gate), on a
    Prefect test harness; yields it and the harness's API URL for processes started from here."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from flows.quickstart import CPU_ONLY_OVERRIDES

    root = tmp_path_factory.mktemp("ddp-flow")
    ws = copy_workspace(workspace_template, root / "ws", root / "dvc-remote")
    params.write_overrides(
        ws.params_file,
        {
            **CPU_ONLY_OVERRIDES,
            "data.source": "synthetic",
            "data.synthetic.classes": 4,
            "data.synthetic.train_per_class": 40,
            "data.synthetic.test_per_class": 12,
            "data.image_size": 16,
            "train.epochs": 1,
            "gate.min_accuracy": 0.0,
            "gate.max_regression": 1.0,
            # a 1-epoch production model is below any useful estimated accuracy: the second run's
            # validate must not stop on it (keep it at or below gate.min_accuracy, params.yaml says)
            "validate.drift.min_estimated_accuracy": 0.0,
            "verify.latency_runs": 5,
            "registry.max_batch_size": 16,
        },
    )
    run(["git", "commit", "-qam", "sized for the tests"], ws.root)
    with prefect_test_harness(server_startup_timeout=120):
        yield ws, str(PREFECT_API_URL.value())


@pytest.mark.slow
def test_visionops_run_with_two_processes_per_node_promotes_and_records_world_size_2(
    flow_ws: tuple[Workspace, str],
) -> None:
    from flows.cli import main

    ws, _ = flow_ws
    assert main(["--workspace", str(ws.root), "run", "-S", "train.nproc_per_node=2"]) == 0
    report = TrainReport.read(ws.train_summary, "train")
    assert (report.world_size, report.nnodes, report.backend, report.per_rank_batch_size) == (
        2, 1, "gloo", report.batch_size // 2,
    )
    card = _card_training(ws)
    assert card["world_size"] == 2 and card["backend"] == "gloo" and card["images_per_s"] > 0


def _production_card(ws: Workspace) -> Card | None:
    return Registry.open(ws, params.load(ws.params_file).registry).production_card()


def _card_training(ws: Workspace) -> dict[str, Any]:
    card = _production_card(ws)
    assert card is not None and card.training is not None
    return dataclasses.asdict(card.training)


def _readme_two_node_commands() -> tuple[list[str], list[str]]:
    """README's node-0 and node-1 commands, as a user runs them (without the `uv run` prefix)."""
    readme = (PROJECT / "README.md").read_text()
    section = readme[readme.index("### Several GPUs and several nodes") :]
    node0, node1 = re.findall(r"```bash\n(.+?)\n```", section)[:2]
    commands = [line.split() for line in (node0, node1)]
    assert all(c[:2] == ["uv", "run"] for c in commands), commands
    return commands[0][2:], commands[1][2:]


@pytest.mark.slow
def test_two_one_process_nodes_meet_on_localhost_with_the_readme_commands(flow_ws: tuple[Workspace, str]) -> None:
    ws, api_url = flow_ws
    node0_cmd, node1_cmd = _readme_two_node_commands()
    assert node0_cmd[:2] == ["visionops", "run"] and node1_cmd == ["python", "-m", "tasks.train"]
    endpoint = f"127.0.0.1:{_free_port()}"
    node0_cmd = [arg.replace("node0:29400", endpoint) for arg in node0_cmd]
    production = _production_card(ws)
    before = 0 if production is None else production.version
    env = {**os.environ, "PREFECT_API_URL": api_url}
    node0 = subprocess.Popen(
        [node0_cmd[0], "--workspace", str(ws.root), *node0_cmd[1:]], cwd=ws.root, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 300
    while params.load(ws.params_file).train.nnodes != 2 and node0.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    node1 = subprocess.Popen(
        [sys.executable, *node1_cmd[1:]], cwd=ws.root, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    out0, _ = node0.communicate(timeout=900)
    if node0.returncode != 0:  # node 1 would wait out the rendezvous timeout for a train that never comes
        node1.kill()
    out1, _ = node1.communicate(timeout=300)
    assert node0.returncode == 0, out0 + out1
    assert node1.returncode == 0, out1

    report = TrainReport.read(ws.train_summary, "train")
    assert (report.world_size, report.nnodes, report.backend) == (2, 2, "gloo")
    production = _production_card(ws)
    assert production is not None and production.version == before + 1
    assert _card_training(ws)["nnodes"] == 2



def test_prefects_own_loader_reads_the_kubernetes_gpu_deployment() -> None:
    from prefect.cli.deploy._config import _load_deploy_configs_and_actions  # private: may move
    from rich.console import Console

    complaints = io.StringIO()  # the loader skips an invalid file with a warning, not an exception
    configs, actions = _load_deploy_configs_and_actions(PROJECT / "prefect.yaml", console=Console(file=complaints))
    assert complaints.getvalue() == ""
    deployments = {c["name"]: c for c in configs}
    assert set(deployments) == {"nightly", "gpu-k8s"}
    gpu = deployments["gpu-k8s"]
    assert gpu["entrypoint"] == deployments["nightly"]["entrypoint"]
    assert gpu["work_pool"]["name"] == "visionops-k8s"
    assert gpu["work_pool"]["job_variables"]["gpus"] >= 1
    overrides = gpu["parameters"]["overrides"]
    assert overrides["train.nproc_per_node"] == "auto"
    raw = params.read_raw(PROJECT / "params.yaml")
    assert params.parse(params.apply_overrides(raw, overrides)).train.nproc_per_node == "auto"
    assert actions["pull"]  # the workspace checkout the runs work in
