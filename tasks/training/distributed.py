"""Data-parallel training beyond one device: the world's size, the launcher, and each rank's place.

``python -m tasks.train`` stays the stage. When params.yaml asks for more than one process
(train.nproc_per_node x train.nnodes), that process becomes torch's elastic agent (the engine of
``torchrun``): it meets the other nodes at the c10d rendezvous, starts ``python -m tasks.train``
once per local rank with RANK/WORLD_SIZE/... in the environment, watches them, and fails the stage
when one dies. Workers join a process group (NCCL on CUDA, gloo on the CPU) and train through
DistributedDataParallel. A one-process run starts no launcher and no process group.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tasks.errors import RuntimeUnavailable, VisionopsError
from tasks.params import ConfigError, TrainParams

log = logging.getLogger(__name__)

RUN_ID = "visionops-train"  # the rendezvous id: every node of one job must use the same
LAUNCHED_ENV = "TORCHELASTIC_RUN_ID"  # set by the elastic agent (and torchrun) in every worker
MONITOR_INTERVAL_S = 0.5  # how often the agent checks its workers: a dead rank is seen this fast
# Topology keys: they decide how the work is split, never the result, so a checkpoint taken at one
# world size resumes at another (tasks/training/checkpoint.py's run key leaves them out).
TOPOLOGY_KEYS = ("nproc_per_node", "nnodes", "rdzv_endpoint", "rdzv_timeout_s")


class RankFailed(VisionopsError):
    """A worker process of a data-parallel run failed or was killed; the message names its rank."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Topology:
    """How many processes train, on how many machines, and where the machines meet."""

    nproc_per_node: int
    nnodes: int
    rdzv_endpoint: str
    rdzv_timeout_s: float

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @classmethod
    def of(cls, t: TrainParams, cuda: bool) -> Topology:
        """train.* resolved on this machine: ``auto`` is every visible GPU, or 1 on the CPU."""
        gpus = torch.cuda.device_count() if cuda else 0
        nproc = t.nproc_per_node if t.nproc_per_node != "auto" else max(1, gpus)
        if cuda and nproc > gpus:
            raise ConfigError(
                f"train.nproc_per_node: {nproc} processes need {nproc} GPUs, torch sees {gpus};"
                " set it to auto or at most the number of GPUs"
            )
        topology = cls(nproc, t.nnodes, t.rdzv_endpoint, t.rdzv_timeout_s)
        if t.batch_size % topology.world_size:
            raise ConfigError(
                f"train.batch_size: the global batch {t.batch_size} does not split evenly over"
                f" {topology.world_size} processes (nproc_per_node {nproc} x nnodes {t.nnodes})"
            )
        if t.sync_batchnorm and not cuda and topology.world_size > 1:
            raise ConfigError(
                "train.sync_batchnorm: torch's SyncBatchNorm runs on CUDA only; set it to false on the CPU"
            )
        return topology


def launched() -> bool:
    """True in a worker started by the elastic agent (ours or a hand-run ``torchrun``)."""
    return LAUNCHED_ENV in os.environ and "RANK" in os.environ


def _rdzv_endpoint(topology: Topology) -> str:
    # One node needs no agreed address: the agent hosts the rendezvous on a free local port.
    return "127.0.0.1:0" if topology.nnodes == 1 else topology.rdzv_endpoint


def _describe_failure(rank: int, exitcode: int, local_rank: int) -> str:
    if exitcode < 0:
        try:
            how = f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-exitcode}"
    else:
        how = f"exited with code {exitcode}"
    return f"rank {rank} (local rank {local_rank} on {socket.gethostname()}) {how}"


def launch(topology: Topology, module: str = "tasks.train", args: Sequence[str] = ()) -> None:
    """Run ``python -m module`` on this node's ranks through torch's elastic launcher; wait for them.

    Raises `RankFailed` naming the rank when a worker dies or fails (the others are stopped), and
    `RuntimeUnavailable` when the nodes do not meet within train.rdzv_timeout_s.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    endpoint = _rdzv_endpoint(topology)
    timeout = int(topology.rdzv_timeout_s)
    config = LaunchConfig(
        min_nodes=topology.nnodes,
        max_nodes=topology.nnodes,
        nproc_per_node=topology.nproc_per_node,
        run_id=RUN_ID,
        rdzv_backend="c10d",
        rdzv_endpoint=endpoint,
        # join_timeout: how long nodes wait for each other; read_timeout: for the rendezvous store
        rdzv_configs={"join_timeout": timeout, "read_timeout": timeout},
        max_restarts=0,  # a dead rank fails the stage; a rerun resumes from the last checkpoint
        monitor_interval=MONITOR_INTERVAL_S,
    )
    log.info(
        "starting %d worker process(es) on this node through torch.distributed's elastic launcher:"
        " world size %d (%d node(s) x %d), rendezvous %s",
        topology.nproc_per_node, topology.world_size, topology.nnodes, topology.nproc_per_node, endpoint,
    )
    try:
        elastic_launch(config, sys.executable)("-m", module, *args)
    except ChildFailedError as exc:
        # When one rank fails the agent stops the others with SIGTERM: those are not the cause.
        stopped = {r for r, f in exc.failures.items() if f.exitcode == -signal.SIGTERM}
        ranks = sorted(set(exc.failures) - stopped) or sorted(stopped)
        described = "; ".join(
            _describe_failure(r, exc.failures[r].exitcode, exc.failures[r].local_rank) for r in ranks
        )
        if stopped - set(ranks):
            described += f" (the launcher then stopped rank(s) {', '.join(map(str, sorted(stopped)))})"
        codes = {exc.failures[r].exitcode for r in ranks}
        # A worker that stopped on a reported error (config 2, gate 3) keeps its code; a crash is 1.
        code = codes.pop() if len(codes) == 1 and codes <= {1, 2, 3} else 1
        raise RankFailed(f"data-parallel training failed: {described}; no candidate was written", code) from exc
    except RendezvousError as exc:
        raise RuntimeUnavailable(
            f"the c10d rendezvous at {topology.rdzv_endpoint} (train.rdzv_endpoint) did not gather the"
            f" {topology.nnodes} nodes of train.nnodes within {timeout} s (train.rdzv_timeout_s):"
            f" start `python -m tasks.train` on every node with the same params.yaml, and check that"
            f" {topology.rdzv_endpoint} is reachable from them ({type(exc).__name__}: {exc})"
        ) from exc


@dataclass(frozen=True)
class Rank:
    """This process's place in the job (rank 0 of a world of 1 when nothing was launched)."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    backend: str  # nccl | gloo | none (one process)

    @property
    def writes(self) -> bool:
        """Only rank 0 writes the checkpoint, the candidate, the history and the reports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE = Rank(rank=0, local_rank=0, world_size=1, local_world_size=1, backend="none")


def join(device: torch.device, timeout_s: float) -> tuple[Rank, torch.device]:
    """In a launched worker: join the process group and take this rank's device (its own GPU)."""
    if not launched():
        return SINGLE, device
    env = os.environ
    rank = Rank(
        rank=int(env["RANK"]),
        local_rank=int(env["LOCAL_RANK"]),
        world_size=int(env["WORLD_SIZE"]),
        local_world_size=int(env["LOCAL_WORLD_SIZE"]),
        backend="nccl" if device.type == "cuda" else "gloo",
    )
    if device.type == "cuda":
        device = torch.device("cuda", rank.local_rank)
        torch.cuda.set_device(device)
    else:
        # The node's cores are shared by its ranks; oversubscribing them slows every rank down.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // rank.local_world_size))
    dist.init_process_group(rank.backend, timeout=timedelta(seconds=timeout_s))
    log.info("rank %d of %d (local rank %d) on %s, backend %s", rank.rank, rank.world_size, rank.local_rank,
             device, rank.backend)
    return rank, device


def leave(rank: Rank) -> None:
    if rank.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, rank: Rank, sync_batchnorm: bool) -> nn.Module:
    """The module the optimiser steps through: DistributedDataParallel when there are several ranks.

    DDP broadcasts rank 0's weights at construction, so every rank starts from the same ones, and
    averages gradients over the ranks: with equal shares that is the gradient of the global batch.
    """
    if not rank.distributed:
        return model
    if sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device = next(model.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def all_sum(value: torch.Tensor, rank: Rank) -> torch.Tensor:
    """``value`` summed over the ranks (a copy; itself when there is one rank)."""
    if not rank.distributed:
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total


def broadcast_buffers(model: nn.Module, rank: Rank) -> None:
    """Rank 0's BatchNorm statistics on every rank: each rank updated its own from its own share."""
    if rank.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def from_rank_0(value: Any, rank: Rank) -> Any:
    """Rank 0's ``value`` on every rank (e.g. the resume checkpoint: every rank resumes from it)."""
    if not rank.distributed:
        return value
    box = [value if rank.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
