"""Issue 12, the data half: ingest and prepare of a dataset whose decoded size is about twice a memory
limit, run inside that limit (a cgroup v1 memory controller where the machine has a writable one,
else the peak RSS of the process tree is measured against it)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.params import write_overrides
from tasks.paths import Workspace

pytestmark = pytest.mark.slow

LIMIT_MB = 600  # for the stage and everything it starts (decoding workers, dvc), page cache included
IMAGE_SIZE = 224  # px: 147 kB decoded per image
IMAGES = 8400  # 1.26 GB decoded, about twice LIMIT_MB; above prepare.POOL_MIN, so the worker pool runs
SOURCE_PX = 24  # px of the tiny PNGs on disk (~2 kB): the data is cheap to make, expensive to decode


def _own_memory_cgroup() -> Path | None:
    """This process's cgroup v1 memory folder, if it can hold a child cgroup."""
    root = Path("/sys/fs/cgroup/memory")
    try:
        own = next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                   if line.split(":", 2)[1] == "memory")
    except (OSError, StopIteration, IndexError):
        return None
    folder = root / own.lstrip("/")
    return folder if (folder / "memory.limit_in_bytes").is_file() and os.access(folder, os.W_OK) else None


class Limit:
    """Runs commands inside a fresh child memory cgroup of ``LIMIT_MB`` (no swap on this machine's kind)."""

    def __init__(self, parent: Path) -> None:
        self.folder = parent / f"visionops-test-{os.getpid()}"
        self.folder.mkdir()
        (self.folder / "memory.limit_in_bytes").write_text(str(LIMIT_MB << 20))
        if (self.folder / "memory.memsw.limit_in_bytes").exists():
            (self.folder / "memory.memsw.limit_in_bytes").write_text(str(LIMIT_MB << 20))  # no escape into swap

    def run(self, cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
        procs = self.folder / "cgroup.procs"
        return subprocess.run(cmd, cwd=cwd, text=True, capture_output=True, timeout=900,
                              preexec_fn=lambda: procs.write_text(str(os.getpid())))

    def oom_kills(self) -> int:
        fields = dict(line.split() for line in (self.folder / "memory.oom_control").read_text().splitlines())
        return int(fields.get("oom_kill", "0"))

    def close(self) -> None:
        self.folder.rmdir()


def _tree_peak_mb(proc: subprocess.Popen[str]) -> float:
    """Peak resident MB of ``proc`` and its descendants, sampled every 0.1 s until it exits."""
    page, peak = os.sysconf("SC_PAGE_SIZE"), 0
    while proc.poll() is None:
        parents = {}
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
        tree, todo = set(), [proc.pid]
        while todo:
            pid = todo.pop()
            tree.add(pid)
            todo += [child for child, parent in parents.items() if parent == pid and child not in tree]
        total = 0
        for pid in tree:
            try:
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
            except (OSError, ValueError, IndexError):
                continue
        peak = max(peak, total)
        time.sleep(0.1)
    return peak / 2**20


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("source")
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        (folder / f"c{i % 4}").mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, (SOURCE_PX, SOURCE_PX, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"c{i % 4}" / f"{i:05d}.png")
    return folder


@pytest.fixture
def limit() -> Iterator[Limit | None]:
    parent = _own_memory_cgroup()
    if parent is None:
        yield None
        return
    cgroup = Limit(parent)
    yield cgroup
    cgroup.close()


def test_ingest_and_prepare_run_inside_a_limit_half_the_decoded_size(
    workspace: Workspace, source: Path, limit: Limit | None
) -> None:
    decoded_mb = IMAGES * 3 * IMAGE_SIZE * IMAGE_SIZE / 2**20
    assert decoded_mb >= 2 * LIMIT_MB, "the dataset must not fit in the limit"
    # data.source as `visionops ingest --source` records it: prepare refuses data/ from another source
    write_overrides(workspace.params_file, {"data.image_size": IMAGE_SIZE, "data.source": str(source)})
    commands = {
        "ingest": [sys.executable, "-m", "tasks.ingest", "--source", str(source)],
        "prepare": [sys.executable, "-m", "tasks.prepare"],
    }
    for stage, cmd in commands.items():
        if limit is not None:
            proc = limit.run(cmd, workspace.root)
            assert proc.returncode == 0 and limit.oom_kills() == 0, f"{stage} in {LIMIT_MB} MB:\n{proc.stderr[-3000:]}"
        else:  # no cgroup to enforce it: measure the whole process tree against the limit instead
            with subprocess.Popen(cmd, cwd=workspace.root, text=True, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE) as popen:
                peak = _tree_peak_mb(popen)
                err = popen.stderr.read() if popen.stderr else ""
            assert popen.returncode == 0, f"{stage}:\n{err[-3000:]}"
            assert peak < LIMIT_MB, f"{stage}: peak RSS of its process tree {peak:.0f} MB > {LIMIT_MB} MB"
    images = np.load(workspace.images("train"), mmap_mode="r")
    labels = np.load(workspace.labels("test"), mmap_mode="r")
    assert images.shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE) and images.shape[0] + len(labels) == IMAGES
    assert len(list(workspace.data.glob("*.parquet"))) >= 2 and (workspace.root / "data.dvc").is_file()
