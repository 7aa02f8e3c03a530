"""The train stage on one CUDA GPU: images/s, time to accuracy, and share of peak bf16 FLOP/s.

Runs the real `tasks.train.train` with params.yaml's `model:` and `train:` (the CIFAR-10 recipe)
on ResNet-18. Data: the workspace's prepared CIFAR-10 when `data/source.json` says cifar10 and
prepared/ holds it (`visionops ingest --source cifar10 && dvc repro prepare`), otherwise
CIFAR-shaped synthetic data (50,000 + 10,000 learnable 32x32 RGB images in 10 classes), which
measures speed but not a CIFAR-10 accuracy. Exits 2 without CUDA. Record the output, with date
and device, in benchmarks/RESULTS.md.

    python benchmarks/gpu_train.py [--workspace .] [--epochs N] [--compile] [--target 0.94]
        [--data-on-device auto|always|never]

``--data-on-device never`` trains from the streamed path (pinned host batches read ahead in a
thread, copied with non_blocking on a side stream) instead of the split held on the GPU.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tasks import params
from tasks.paths import Workspace
from tasks.train import TrainSections, train
from tasks.training.models import build_model

# Dense bf16 tensor-core peak per GPU (vendor datasheets, without sparsity), matched on the
# device name torch reports. FLOP/s.
PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("RTX 4090", 165e12),
)
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 50_000, 10_000


def peak_bf16(device_name: str) -> float | None:
    for key, flops in PEAK_BF16:
        if key in device_name:
            return flops
    return None


def training_flops_per_image(arch: str, stem: str, channels: int, size: int, classes: int) -> float:
    """Forward + backward FLOPs of one image (counted by torch on a batch of 8 on the CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(arch, stem, classes, channels)
    x = torch.randn(8, channels, size, size)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops() / 8


def synthetic_cifar(ws: Workspace, seed: int = 0) -> None:
    """Learnable CIFAR-shaped data: per class a smooth random colour pattern, shifted and noised."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (10, 3, 8, 8))
    prototypes = coarse.repeat(4, axis=2).repeat(4, axis=3)  # 8x8 blocks -> 32x32
    ws.prepared.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", SYNTHETIC_TRAIN), ("test", SYNTHETIC_TEST)):
        labels = rng.integers(0, 10, n)
        shifts = rng.integers(-4, 5, (n, 2))
        images = np.empty((n, 3, 32, 32), dtype=np.uint8)
        for start in range(0, n, 5000):  # in chunks, to bound float64 temporaries
            end = min(n, start + 5000)
            block = prototypes[labels[start:end]] + rng.normal(0, 60, (end - start, 3, 32, 32))
            for i in range(end - start):
                block[i] = np.roll(block[i], tuple(shifts[start + i]), axis=(1, 2))
            images[start:end] = block.clip(0, 255).astype(np.uint8)
        np.save(ws.images(split), images)
        np.save(ws.labels(split), labels.astype(np.int64))
    ws.classes.write_text(json.dumps([f"class_{i}" for i in range(10)]))


def cifar10_prepared(source: Workspace) -> bool:
    info = source.data / "source.json"
    if not info.is_file() or json.loads(info.read_text()).get("source") != "cifar10":
        return False
    return all(source.images(s).is_file() and source.labels(s).is_file() for s in ("train", "test"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, default=Path.cwd())
    parser.add_argument("--epochs", type=int, help="override train.epochs")
    parser.add_argument("--compile", action="store_true", help="train.compile=true")
    parser.add_argument("--target", type=float, default=0.94, help="test accuracy for time-to-accuracy")
    parser.add_argument("--data-on-device", choices=("auto", "always", "never"), help="override train.data_on_device")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            "gpu_train: CUDA is not available (torch sees no GPU); run this on a machine with an NVIDIA GPU",
            file=sys.stderr,
        )
        return 2

    source = Workspace(args.workspace.resolve())
    loaded = params.load(source.params_file)
    p = dataclasses.replace(
        loaded.train,
        device="cuda",
        epochs=args.epochs or loaded.train.epochs,
        compile=args.compile or loaded.train.compile,
        data_on_device=args.data_on_device or loaded.train.data_on_device,
    )
    m = dataclasses.replace(loaded.model, arch="resnet18", weights="none")

    with tempfile.TemporaryDirectory(prefix="gpu_train-") as tmp:
        ws = Workspace(Path(tmp))
        if cifar10_prepared(source):
            data = "CIFAR-10 (prepared/ of the workspace)"
            shutil.copytree(source.prepared, ws.prepared)
        else:
            data = f"CIFAR-shaped synthetic ({SYNTHETIC_TRAIN} + {SYNTHETIC_TEST} images; no CIFAR-10 in {source.root})"
            synthetic_cifar(ws)
        start = time.perf_counter()
        result = train(TrainSections(model=m, train=p, registry=loaded.registry), ws)
        wall = time.perf_counter() - start
        with ws.train_history.open() as fh:
            history = list(csv.DictReader(fh))

    images_per_epoch = result.images_per_s * result.train_seconds / p.epochs  # steps x batch
    elapsed, time_to_target = 0.0, None
    for row in history:
        elapsed += images_per_epoch / float(row["images_per_s"])
        if time_to_target is None and float(row["test_accuracy"]) >= args.target:
            time_to_target = (int(row["epoch"]), elapsed)
    steady = max(float(r["images_per_s"]) for r in history[1:]) if len(history) > 1 else result.images_per_s
    flops_per_image = training_flops_per_image(m.arch, m.stem, 3, 32, 10)
    name = torch.cuda.get_device_name()
    peak = peak_bf16(name)

    print(f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"device: {name}; torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(f"data: {data}; {result.data_placement} (train.data_on_device {p.data_on_device})")
    print(
        f"recipe: {m.arch} {m.stem} stem, {p.epochs} epochs, batch {result.batch_size},"
        f" peak lr {result.peak_lr:.4g}, {p.optimizer}, {p.schedule}, compile={p.compile}"
    )
    print(f"test accuracy: {result.test_accuracy:.4f}")
    print(
        f"training time: {result.train_seconds:.1f} s"
        f" (steps only; stage wall time incl. evaluation and checkpoints {wall:.1f} s)"
    )
    print(f"images/s: {result.images_per_s:,.0f} mean, {steady:,.0f} best epoch after the first")
    if time_to_target is None:
        print(f"time to {args.target:.0%}: not reached in {p.epochs} epochs")
    else:
        print(f"time to {args.target:.0%}: {time_to_target[1]:.1f} s of training (epoch {time_to_target[0]})")
    achieved = flops_per_image * steady
    print(
        f"training FLOPs per image: {flops_per_image / 1e9:.2f} GFLOP (forward + backward);"
        f" achieved {achieved / 1e12:.1f} TFLOP/s"
    )
    if peak is None:
        print(f"fraction of peak bf16: unknown (no datasheet peak for {name!r} in PEAK_BF16)")
    else:
        print(
            f"fraction of peak bf16: {achieved / peak:.1%}"
            f" of an assumed {peak / 1e12:.0f} TFLOP/s dense bf16 for {name}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
