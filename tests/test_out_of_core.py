"""Issue 12: ingest, prepare, train and evaluate of a dataset whose decoded size is about twice a
memory limit, each run inside that limit (a cgroup v1 memory controller where the machine has a
writable one, else the peak RSS of the process tree is measured against it).

Each split alone is larger than the limit too, so neither train nor evaluate could hold one. A
control run that holds the train split (``train.data_on_device: always``) is killed in the same
cgroup: the limit binds, and only the streamed path fits under it."""

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

from tasks.blessing.reports import MetricsReport, TrainReport
from tasks.params import write_overrides
from tasks.paths import Workspace

pytestmark = pytest.mark.slow

# For the stage and everything it starts (decoding workers, dvc), page cache included. A streamed
# training run needs torch's floor (about 370 MB of anonymous memory once torch and torchvision
# are imported) plus its batches: 700 MB at 224 px, batch 16, measured.
LIMIT_MB = 850
IMAGE_SIZE = 224  # px: 147 kB decoded per image
IMAGES = 12_000  # 1.68 GiB decoded, about twice LIMIT_MB; above prepare.POOL_MIN, so the worker pool runs
TEST_FRACTION = 0.5  # 861 MiB each split: evaluate's data alone exceeds the limit too
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
    """Peak anonymous resident MB of ``proc`` and its descendants, sampled every 0.1 s until it exits.

    Anonymous (resident minus file-backed) is what the processes hold themselves: torch's mapped
    libraries (about 300 MB resident) are page cache that the kernel can drop and read again."""
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
                resident, shared = Path(f"/proc/{pid}/statm").read_text().split()[1:3]
                total += (int(resident) - int(shared)) * page
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


def _run_stage(cmd: list[str], cwd: Path, limit: Limit | None) -> tuple[int, str]:
    """Run ``cmd`` inside ``limit``, or, with no cgroup to enforce one, measure its process tree
    against ``LIMIT_MB`` (a peak above it is reported as exit code 137, as the cgroup would kill it)."""
    if limit is not None:
        proc = limit.run(cmd, cwd)
        return proc.returncode, proc.stderr
    with subprocess.Popen(cmd, cwd=cwd, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as popen:
        peak = _tree_peak_mb(popen)
        err = popen.stderr.read() if popen.stderr else ""
    if popen.returncode == 0 and peak >= LIMIT_MB:
        return 137, f"peak anonymous RSS of its process tree {peak:.0f} MB > {LIMIT_MB} MB\n{err}"
    return popen.returncode, err


def _stage(name: str) -> list[str]:
    return [sys.executable, "-m", f"tasks.{name}"]


def test_ingest_prepare_train_and_evaluate_run_inside_a_limit_half_the_decoded_size(
    workspace: Workspace, source: Path, limit: Limit | None
) -> None:
    decoded_mb = IMAGES * 3 * IMAGE_SIZE * IMAGE_SIZE / 2**20
    assert decoded_mb >= 2 * LIMIT_MB, "the dataset must not fit in the limit"
    write_overrides(workspace.params_file, {
        "data.image_size": IMAGE_SIZE,
        "data.source": str(source),  # as `visionops ingest --source` records it: prepare checks it
        "data.test_fraction": TEST_FRACTION,
        # The ImageNet-style fine-tune (head only) of a small model: the cheapest real training on
        # the CPU. Random weights and noise images: this test is about memory, not accuracy.
        "model.arch": "mobilenet_v3_small",
        "model.stem": "imagenet",
        "train.device": "cpu",
        "train.freeze": "backbone",
        "train.epochs": 1,
        "train.batch_size": 16,  # evaluation batches are twice that: 224 px activations must fit too
        "train.data_on_device": "auto",
        "train.device_budget_gb": LIMIT_MB * 2**20 / 1e9,  # what a user would set: the data does not fit
        "gate.min_accuracy": 0.0,
    })
    commands = {
        "ingest": [*_stage("ingest"), "--source", str(source)],
        "prepare": _stage("prepare"),
        "train": _stage("train"),
        "evaluate": _stage("evaluate"),
    }
    for stage, cmd in commands.items():
        started = time.monotonic()
        code, err = _run_stage(cmd, workspace.root, limit)
        print(f"{stage}: {time.monotonic() - started:.1f} s")  # shown with -s: where this slow test spends its time
        oom = limit.oom_kills() if limit is not None else 0
        assert code == 0 and oom == 0, f"{stage} in {LIMIT_MB} MiB (exit {code}, {oom} OOM kills):\n{err[-3000:]}"

    train_images = np.load(workspace.images("train"), mmap_mode="r")
    test_labels = np.load(workspace.labels("test"), mmap_mode="r")
    assert train_images.shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE) and train_images.shape[0] + len(test_labels) == IMAGES
    assert min(train_images.nbytes, len(test_labels) * train_images[0].nbytes) > LIMIT_MB << 20, "each split > limit"
    assert len(list(workspace.data.glob("*.parquet"))) >= 2 and (workspace.root / "data.dvc").is_file()
    train = TrainReport.read(workspace.train_summary, "train")
    assert train.data_placement == "streamed" and train.epochs == 1
    assert train.steps_per_epoch == len(train_images) // 16
    metrics = MetricsReport.read(workspace.metrics, "evaluate")
    assert metrics.n_test == len(test_labels) == sum(map(sum, metrics.confusion_matrix))  # every test image scored

    if limit is not None:  # the control: holding the train split breaks the same limit
        write_overrides(workspace.params_file, {"train.data_on_device": "always"})
        code, err = _run_stage(commands["train"], workspace.root, limit)
        held = train_images.nbytes >> 20
        assert code != 0 and limit.oom_kills() >= 1, f"train holding {held} MiB fit in {LIMIT_MB} MiB"
