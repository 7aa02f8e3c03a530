"""Data-parallel scaling of the train stage: images/s on 1 and on N processes, and the efficiency.

Runs the real stage, ``python -m tasks.train``, twice on the same data and params.yaml recipe:
once with train.nproc_per_node=1 and once with N (one process per GPU, DistributedDataParallel over
NCCL). The stage's own `reports/train.json` gives the whole job's images/s (global batch x steps /
training seconds). Scaling efficiency = images/s at N / (N x images/s at 1). The global batch is
the same in both runs (train.batch_size), so each GPU gets 1/N of it at N.

Data: CIFAR-shaped synthetic (benchmarks/gpu_train.py's 50,000 + 10,000 learnable 32x32 images).
Exits 2 without CUDA. ``--cpu`` measures the same two runs with gloo on the CPU instead (N
processes share the machine's cores: on a 2-core machine that measures overhead, not scaling).

    python benchmarks/gpu_scaling.py [--nproc N] [--epochs 2] [--batch-size 512]
    python benchmarks/gpu_scaling.py --cpu [--nproc 2] [--train 4000 --test 1000 --size 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from gpu_train import synthetic_cifar  # benchmarks/ is on sys.path when this script runs

from tasks import params
from tasks.paths import Workspace

PROJECT = Path(__file__).resolve().parents[1]


def small_synthetic(ws: Workspace, n_train: int, n_test: int, size: int) -> None:
    """Learnable data for CPU runs: 10 classes of a smooth colour pattern plus noise."""
    rng = np.random.default_rng(0)
    prototypes = rng.uniform(0, 255, (10, 3, 4, 4)).repeat(size // 4, axis=2).repeat(size // 4, axis=3)
    ws.prepared.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, n)
        images = (prototypes[labels] + rng.normal(0, 50, (n, 3, size, size))).clip(0, 255).astype(np.uint8)
        np.save(ws.images(split), images)
        np.save(ws.labels(split), labels.astype(np.int64))
    ws.classes.write_text(json.dumps([f"class_{i}" for i in range(10)]))


def run_stage(ws: Workspace, raw: dict, nproc: int) -> dict:
    """``python -m tasks.train`` in ``ws`` with train.nproc_per_node=nproc; its reports/train.json."""
    raw = {**raw, "train": {**raw["train"], "nproc_per_node": nproc}}
    ws.params_file.write_text(yaml.safe_dump(raw))
    ws.candidate.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    proc = subprocess.run([sys.executable, "-m", "tasks.train"], cwd=ws.root, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"gpu_scaling: the train stage failed at nproc_per_node={nproc} (exit {proc.returncode})")
    return json.loads(ws.train_summary.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="gloo on the CPU instead of NCCL on GPUs")
    parser.add_argument("--nproc", type=int, help="processes of the parallel run (default: every GPU; 2 on --cpu)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=512, help="train.batch_size: the global batch")
    parser.add_argument("--train", type=int, default=4000, help="--cpu: train images")
    parser.add_argument("--test", type=int, default=1000, help="--cpu: test images")
    parser.add_argument("--size", type=int, default=16, help="--cpu: image side, px")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print(
            "gpu_scaling: CUDA is not available (torch sees no GPU); run this on a machine with NVIDIA GPUs,"
            " or pass --cpu for the gloo comparison on the CPU",
            file=sys.stderr,
        )
        return 2
    nproc = args.nproc or (2 if args.cpu else torch.cuda.device_count())
    if nproc < 2:
        print(f"gpu_scaling: a scaling measurement needs at least 2 processes, got {nproc}", file=sys.stderr)
        return 2

    raw = params.read_raw(PROJECT / "params.yaml")
    raw["model"] = {**raw["model"], "arch": "resnet18", "weights": "none"}
    raw["train"] = {
        **raw["train"], "device": "cpu" if args.cpu else "cuda", "epochs": args.epochs, "batch_size": args.batch_size,
        "min_steps_per_epoch": 1, "data_on_device": "always",
    }
    params.parse(raw)  # a bad flag fails here, not in the stage
    with tempfile.TemporaryDirectory(prefix="gpu_scaling-") as tmp:
        ws = Workspace(Path(tmp))
        if args.cpu:
            small_synthetic(ws, args.train, args.test, args.size)
            data = f"synthetic {args.train} + {args.test} images of {args.size}x{args.size}x3"
        else:
            synthetic_cifar(ws)
            data = "CIFAR-shaped synthetic 50,000 + 10,000 images of 32x32x3"
        started = time.perf_counter()
        one = run_stage(ws, raw, 1)
        many = run_stage(ws, raw, nproc)
        wall = time.perf_counter() - started

    device = "CPU, gloo" if args.cpu else f"{torch.cuda.get_device_name()}, NCCL"
    efficiency = many["images_per_s"] / (nproc * one["images_per_s"])
    print(f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}; {os.cpu_count()} CPUs; torch {torch.__version__}")
    print(f"device: {device}; data: {data}; resnet18, {args.epochs} epochs, global batch {one['batch_size']}")
    for report in (one, many):
        print(
            f"world size {report['world_size']} ({report['backend']}): per-rank batch {report['per_rank_batch_size']},"
            f" {report['images_per_s']:,.1f} images/s, test accuracy {report['test_accuracy']:.4f}"
        )
    print(f"wall time of both runs: {wall:.0f} s")
    print(f"speedup: {many['images_per_s'] / one['images_per_s']:.2f}x; scaling efficiency: {efficiency:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
