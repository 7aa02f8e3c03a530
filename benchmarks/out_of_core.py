"""Out-of-core: the peak RSS of every stage next to the decoded size, and streamed vs on-device training.

1. Pipeline. A synthetic class-folder dataset (JPEG files; classes differ in colour and stripe
   direction, so one epoch learns them) of ``--decoded-gb`` of pixels at ``--size`` px goes through
   ingest, prepare, validate, train (1 epoch), evaluate, export and verify, each run as its
   ``python -m tasks.<stage>`` entry in a fresh git+DVC workspace. Each stage's peak RSS is read
   with ``wait4`` (the largest of its processes, dvc children included). ``--from prepared`` writes
   prepared/*.npy directly instead (no ingest, prepare, validate): the train/score half alone.
2. Throughput. The first ``--compare-images`` train images (and as many test images), copied into
   a second workspace, are trained for one epoch held on the device and streamed, alternately
   ``--repeats`` times; the best images/s of each counts (other load on a shared machine only
   slows a run down).

Targets (issue 12): every stage's peak RSS at most 1.5 GB while the decoded dataset is at least
twice that; streamed training at least 0.8x the on-device images/s. The last line is
``streamed/on-device: <x>x``. Record the output in benchmarks/RESULTS.md.

    python benchmarks/out_of_core.py [--decoded-gb 3] [--size 128] [--arch mobilenet_v3_small]
        [--batch 64] [--freeze none|backbone] [--device-budget-gb 1.0] [--from folder|prepared]
        [--compare-images 4000] [--repeats 2] [--workdir DIR]

A smaller ``--decoded-gb`` with a ``--device-budget-gb`` below it still makes ``auto`` stream (the
peak RSS then cannot be below the decoded size: torch alone takes about 0.8 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from tasks import params
from tasks.data.prepared import PreparedImages
from tasks.paths import Workspace

PROJECT = Path(__file__).resolve().parents[1]
RSS_TARGET = 1.5e9  # bytes, per stage
THROUGHPUT_TARGET = 0.8  # streamed / on-device images/s
CLASSES = 8  # 4 dominant colours x 2 stripe directions
TEST_FRACTION = 0.2
CHUNK = 1000  # images drawn at once
ENV = {
    "GX_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PYTHONPATH": str(PROJECT),
    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
}


def draw(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (n, 3, size, size): class k is a colour (k % 4) with stripes across (k < 4) or down."""
    n = len(labels)
    period = rng.uniform(size / 8, size / 3, (n, 1, 1))
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    coords = np.arange(size, dtype=np.float32)
    across = np.sin(2 * np.pi * coords[None, :, None] / period + phase) > 0  # varies down the rows
    down = np.sin(2 * np.pi * coords[None, None, :] / period + phase) > 0
    stripes = np.where((labels < 4)[:, None, None], across, down)
    images = rng.integers(0, 90, (n, 3, size, size), dtype=np.uint8)
    colour = labels % 4  # 0..2: that channel is bright; 3: all three (grey)
    for channel in range(3):
        lit = ((colour == channel) | (colour == 3))[:, None, None] & stripes
        images[:, channel] += (lit * 150).astype(np.uint8)
    return images


def _counts(decoded_gb: float, size: int) -> tuple[int, int]:
    total = int(decoded_gb * 1e9 // (3 * size * size))
    n_test = int(total * TEST_FRACTION)
    return total - n_test, n_test


def write_folders(root: Path, decoded_gb: float, size: int) -> int:
    """``root/{train,test}/<class>/<i>.jpg``; the decoded bytes."""
    rng = np.random.default_rng(0)
    written = 0
    for split, n in zip(("train", "test"), _counts(decoded_gb, size), strict=True):
        for start in range(0, n, CHUNK):
            labels = np.arange(start, min(n, start + CHUNK)) % CLASSES
            for i, (label, image) in enumerate(zip(labels, draw(labels, size, rng), strict=True)):
                folder = root / split / f"class_{label}"
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{start + i:07d}.jpg", quality=92)
            written += len(labels) * 3 * size * size
    return written


def write_prepared(ws: Workspace, decoded_gb: float, size: int) -> int:
    """prepared/{split}_images.npy etc. written chunk by chunk (open_memmap, as prepare does)."""
    rng = np.random.default_rng(0)
    ws.prepared.mkdir(parents=True, exist_ok=True)
    for split, n in zip(("train", "test"), _counts(decoded_gb, size), strict=True):
        labels = (np.arange(n) % CLASSES).astype(np.int64)
        images = np.lib.format.open_memmap(ws.images(split), mode="w+", dtype=np.uint8, shape=(n, 3, size, size))
        for start in range(0, n, CHUNK):
            end = min(n, start + CHUNK)
            images[start:end] = draw(labels[start:end], size, rng)
        images.flush()
        del images
        np.save(ws.labels(split), labels)
    ws.classes.write_text(json.dumps([f"class_{k}" for k in range(CLASSES)]))
    return sum(PreparedImages(ws.images(s)).nbytes for s in ("train", "test"))


def copy_subset(source: Workspace, target: Workspace, n_train: int) -> None:
    """The first ``n_train`` train images and a proportional share of the test images."""
    target.prepared.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", max(1, round(n_train * TEST_FRACTION)))):
        images = PreparedImages(source.images(split))
        n = min(n, len(images))
        out = np.lib.format.open_memmap(target.images(split), mode="w+", dtype=np.uint8, shape=(n, *images.shape[1:]))
        for start in range(0, n, CHUNK):
            out[start : min(n, start + CHUNK)] = images[start : min(n, start + CHUNK)]
        out.flush()
        del out
        np.save(target.labels(split), np.load(source.labels(split))[:n])
    shutil.copy2(source.classes, target.classes)


def make_workspace(root: Path, overrides: dict[str, Any]) -> Workspace:
    """A git+DVC repository with this project's params.yaml (plus ``overrides``) and dvc.yaml."""
    root.mkdir(parents=True)
    raw = params.apply_overrides(params.read_raw(PROJECT / "params.yaml"), overrides)
    params.parse(raw)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy2(PROJECT / name, root / name)
    env = {**os.environ, **ENV}
    for cmd in (
        ["git", "init", "-q", "-b", "main"],
        ["dvc", "init", "-q"],
        ["dvc", "remote", "add", "-d", "local", str(root.parent / f"{root.name}-remote")],
    ):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    return Workspace(root)


@dataclass(frozen=True)
class StageRun:
    stage: str
    exit_code: int
    peak_rss: int  # bytes
    seconds: float
    log: Path


def run_stage(ws: Workspace, stage: str, args: list[str] | None = None) -> StageRun:
    """``python -m tasks.<stage>`` in ``ws``: its exit code, peak RSS (wait4) and wall time."""
    log = ws.root.parent / f"{ws.root.name}-{stage}.log"
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", f"tasks.{stage}", *(args or [])],
            cwd=ws.root, env={**os.environ, **ENV}, stdout=out, stderr=subprocess.STDOUT,
        )
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return StageRun(stage, proc.returncode, usage.ru_maxrss * 1024, time.perf_counter() - start, log)


def _report(run: StageRun, decoded: int) -> str:
    verdict = "ok" if run.peak_rss <= RSS_TARGET else "OVER 1.5 GB"
    status = "" if run.exit_code == 0 else f"  EXIT {run.exit_code}: see {run.log}"
    return (
        f"{run.stage:9s} peak RSS {run.peak_rss / 1e9:6.2f} GB ({run.peak_rss / decoded:4.0%} of decoded)"
        f"  {run.seconds:7.1f} s  {verdict}{status}"
    )


def pipeline(ws: Workspace, args: argparse.Namespace, work: Path) -> tuple[int, bool]:
    """Run the stages; print one line per stage; (decoded bytes, every stage exited 0)."""
    if args.source == "folder":
        folders = work / "class-folders"
        print(f"writing {args.decoded_gb} GB of decoded pixels as JPEG class folders in {folders} ...", flush=True)
        decoded = write_folders(folders, args.decoded_gb, args.size)
        params.write_overrides(ws.params_file, {"data.source": str(folders)})  # as `visionops ingest` records it
        stages = [("ingest", ["--source", str(folders)]), ("prepare", None), ("validate", None)]
    else:
        decoded = write_prepared(ws, args.decoded_gb, args.size)
        stages = []
    stages += [("train", None), ("evaluate", None), ("export", None), ("verify", None)]
    print(f"decoded dataset: {decoded / 1e9:.2f} GB ({args.size} px, {CLASSES} classes)", flush=True)
    ok = True
    for stage, stage_args in stages:
        run = run_stage(ws, stage, stage_args)
        print(_report(run, decoded), flush=True)
        if run.exit_code != 0:
            print("".join(run.log.read_text().splitlines(keepends=True)[-15:]), file=sys.stderr)
            ok = False
            break
    return decoded, ok


def throughput(source: Workspace, args: argparse.Namespace, work: Path, overrides: dict[str, Any]) -> float | None:
    """Best images/s held on the device and streamed, on the same subset; streamed / on-device."""
    subset = make_workspace(work / "compare", overrides)
    copy_subset(source, subset, args.compare_images)
    best = {"always": 0.0, "never": 0.0}
    for _ in range(args.repeats):
        for choice in best:
            raw = params.apply_overrides(params.read_raw(subset.params_file), {"train.data_on_device": choice})
            subset.params_file.write_text(yaml.safe_dump(raw))
            run = run_stage(subset, "train")
            if run.exit_code != 0:
                print(f"train ({choice}) exited {run.exit_code}: see {run.log}", file=sys.stderr)
                return None
            report = json.loads(subset.train_summary.read_text())
            best[choice] = max(best[choice], float(report["images_per_s"]))
            print(
                f"train on {args.compare_images} images, data_on_device={choice}: {report['images_per_s']:,.0f} img/s"
                f" ({report['data_placement']}), peak RSS {run.peak_rss / 1e9:.2f} GB",
                flush=True,
            )
    return best["never"] / best["always"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decoded-gb", type=float, default=3.0, help="decoded pixels of train + test, GB")
    parser.add_argument("--size", type=int, default=128, help="px")
    parser.add_argument("--arch", default="mobilenet_v3_small")
    parser.add_argument("--batch", type=int, default=64, help="train.batch_size")
    parser.add_argument("--freeze", choices=("none", "backbone"), default="none", help="train.freeze")
    parser.add_argument("--device-budget-gb", type=float, default=1.0, help="train.device_budget_gb, GB")
    parser.add_argument("--from", dest="source", choices=("folder", "prepared"), default="folder")
    parser.add_argument("--compare-images", type=int, default=4000, help="train images of the throughput part")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each placement in the throughput part")
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a temporary folder)")
    args = parser.parse_args()

    overrides: dict[str, Any] = {
        "data.image_size": args.size,
        "model.arch": args.arch,
        "model.stem": "imagenet",
        "train.device": "cpu",
        "train.epochs": 1,
        "train.batch_size": args.batch,
        "train.freeze": args.freeze,
        "train.data_on_device": "auto",  # the decoded set is larger than the budget: auto must stream
        "train.device_budget_gb": args.device_budget_gb,
        "gate.min_accuracy": 0.0,  # measured here, not gated
        "verify.provider": "cpu",
        "registry.max_batch_size": 64,
    }
    work = args.workdir or Path(tempfile.mkdtemp(prefix="out_of_core-"))
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}; {os.cpu_count()} CPUs; load average"
        f" {os.getloadavg()[0]:.1f}; work in {work}",
        flush=True,
    )
    try:
        ws = make_workspace(work / "pipeline", overrides)
        decoded, ok = pipeline(ws, args, work)
        if ok:
            print(f"accuracy after 1 epoch: {json.loads(ws.metrics.read_text())['accuracy']:.4f} (evaluate)")
        ratio = throughput(ws, args, work, overrides) if ws.images("train").is_file() else None
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"targets: peak RSS <= {RSS_TARGET / 1e9:.1f} GB per stage with decoded >= {2 * RSS_TARGET / 1e9:.1f} GB"
          f" (decoded here {decoded / 1e9:.2f} GB); streamed >= {THROUGHPUT_TARGET}x on-device")
    if ratio is not None:
        print(f"streamed/on-device: {ratio:.2f}x")
    return 0 if ok and ratio is not None else 1


if __name__ == "__main__":
    sys.exit(main())
