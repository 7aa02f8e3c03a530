"""Data-path memory benchmark: peak RSS of ingest and prepare next to the decoded size of the data.

Writes a class-folder dataset of JPEG images (smooth random colour fields, ``--size`` px), ingests
it into a fresh git+DVC workspace (``python -m tasks.ingest``) and prepares it at
``data.image_size = --size`` (``python -m tasks.prepare``), each stage in its own process. For each
stage it prints the peak RSS of the stage's own process, of its largest child (decoding workers,
``dvc``), and of its whole process tree (sampled every 0.1 s), against the decoded size of the
dataset (images x 3 x size x size bytes).

    python benchmarks/data_memory.py [--images 14000] [--size 224] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.params import write_overrides  # noqa: E402

CLASSES = 10
PAGE = os.sysconf("SC_PAGE_SIZE")
# Runs a stage module as `python -m` would (spawned workers re-import it), then reports the peak RSS
# of its own memory map (VmHWM: ru_maxrss would count what the forking parent held before exec).
STAGE = (
    "import runpy, sys\n"
    "sys.argv = [sys.argv[1], *sys.argv[2:]]\n"
    "code = 0\n"
    "try:\n"
    "    runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
    "except SystemExit as exc:\n"
    "    code = exc.code or 0\n"
    "hwm = next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM'))\n"
    "print(f'VMHWM {hwm}', file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def write_dataset(folder: Path, images: int, size: int) -> int:
    """``images`` JPEGs in ``CLASSES`` folders; their bytes."""
    rng = np.random.default_rng(0)
    total = 0
    for i in range(images):
        label = i % CLASSES
        (folder / f"c{label}").mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # JPEG-friendly, like a photo's colour fields
        img = Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR)
        path = folder / f"c{label}" / f"{i:06d}.jpg"
        img.save(path, quality=85)
        total += path.stat().st_size
    return total


def make_workspace(root: Path, remote: Path, size: int) -> None:
    root.mkdir(parents=True)
    for name in ("params.yaml", "dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy2(ROOT / name, root / name)
    shutil.copytree(ROOT / "tasks", root / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "remote", "add", "-d", "local", str(remote)]):
        subprocess.run(cmd, cwd=root, check=True, env=_env())
    write_overrides(root / "params.yaml", {"data.image_size": size, "data.channels": 3})


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}


def _tree_rss(pid: int) -> dict[int, int]:
    """Bytes resident in ``pid`` and in each of its descendants right now."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parents[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, todo = set(), [pid]
    while todo:
        current = todo.pop()
        tree.add(current)
        todo.extend(child for child, parent in parents.items() if parent == current and child not in tree)
    resident: dict[int, int] = {}
    for member in tree:
        try:
            with open(f"/proc/{member}/statm") as fh:
                resident[member] = int(fh.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
    return resident


def run_stage(ws: Path, module: str, *args: str) -> dict[str, float]:
    """Run one stage; its wall time and peak RSS (MB): own process, largest child (sampled), whole tree
    (sampled: the sum over the stage and every process it started, at the same moment)."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", STAGE, module, *args], cwd=ws, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0, 0]  # tree, largest child

    def sample() -> None:
        while proc.poll() is None:
            resident = _tree_rss(proc.pid)
            peak[0] = max(peak[0], sum(resident.values()))
            peak[1] = max([peak[1], *(rss for pid, rss in resident.items() if pid != proc.pid)])
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _out, err = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{module} failed (exit {proc.returncode}):\n{err[-3000:]}")
    own_kb = int(next(line for line in err.splitlines() if line.startswith("VMHWM "))[6:])
    return {"seconds": time.monotonic() - started, "self_mb": own_kb / 1024,
            "child_mb": peak[1] / 2**20, "tree_mb": peak[0] / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=14000, help="images in all (10 classes)")
    parser.add_argument("--size", type=int, default=224, help="px, of the JPEGs and of data.image_size")
    parser.add_argument("--keep", type=Path, help="work here and keep it (default: a temporary folder)")
    args = parser.parse_args()
    tmp = args.keep or Path(tempfile.mkdtemp(prefix="visionops-memory-"))
    try:
        started = time.monotonic()
        encoded = write_dataset(tmp / "source", args.images, args.size)
        print(f"dataset: {args.images} JPEGs of {args.size}x{args.size}, {encoded / 1e6:,.0f} MB encoded,"
              f" written in {time.monotonic() - started:.0f} s")
        decoded = args.images * 3 * args.size * args.size
        make_workspace(tmp / "ws", tmp / "remote", args.size)
        stages = {
            "ingest": run_stage(tmp / "ws", "tasks.ingest", "--source", str(tmp / "source")),
            "prepare": run_stage(tmp / "ws", "tasks.prepare"),
        }
        shards = len(list((tmp / "ws" / "data").glob("*.parquet")))
        print(f"decoded size: {decoded / 2**20:,.0f} MB ({args.images} x 3 x {args.size} x {args.size} bytes);"
              f" data/ holds {shards} Parquet shards")
        for name, m in stages.items():
            print(f"{name}: {m['seconds']:.0f} s; peak RSS: stage process {m['self_mb']:,.0f} MB, largest child"
                  f" (workers, dvc) {m['child_mb']:,.0f} MB, whole process tree {m['tree_mb']:,.0f} MB"
                  f" = {m['tree_mb'] / (decoded / 2**20):.2f}x the decoded size")
        print(f"cores: {len(os.sched_getaffinity(0))}; load average now {os.getloadavg()[0]:.1f}")
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
