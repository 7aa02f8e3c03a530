"""Shared fixtures: a real git+DVC workspace in tmp_path, telemetry off everywhere.

Tiers (pyproject.toml markers): unmarked tests are the unit tier (in-process, seconds each);
``integration`` tests start real processes (git, DVC, stage entries, GX, Prefect, ONNX export);
``slow`` tests run whole pipelines or servers. CI runs all three.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tasks.data.raw import RawDataset, RawImage
from tasks.params import IngestParams
from tasks.paths import Workspace

from s3_server import S3_CLIENT, S3Server

PROJECT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

for _key, _value in {
    "GX_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GIT_AUTHOR_NAME": "visionops-tests",
    "GIT_AUTHOR_EMAIL": "tests@visionops.invalid",
    "GIT_COMMITTER_NAME": "visionops-tests",
    "GIT_COMMITTER_EMAIL": "tests@visionops.invalid",
}.items():
    os.environ.setdefault(_key, _value)
# Stages run as `python -m tasks.<stage>` and the CLI as `visionops`: both from this venv.
os.environ["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"


def run(cmd: list[str], cwd: Path, check: bool = True, **kwargs) -> subprocess.CompletedProcess[str]:
    """Run a real command (git, dvc, visionops) and keep its output for assertion messages."""
    proc = subprocess.run(cmd, cwd=cwd, text=True, capture_output=True, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_workspace(root: Path, remote: Path) -> Workspace:
    """A fresh git+DVC repository laid out like this project, with a local DVC remote at ``remote``."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("params.yaml", "dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy2(PROJECT / name, root / name)
    shutil.copytree(PROJECT / "tasks", root / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    run(["git", "init", "-q", "-b", "main"], root)
    run(["dvc", "init", "-q"], root)
    run(["dvc", "config", "core.analytics", "false"], root)
    run(["dvc", "remote", "add", "-d", "local", str(remote)], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "workspace"], root)
    return Workspace(root)


@pytest.fixture(scope="session")
def workspace_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One `git init` + `dvc init` per session (10-14 s on a busy machine); tests get copies."""
    root = tmp_path_factory.mktemp("template")
    return make_workspace(root / "ws", root / "dvc-remote").root


def copy_workspace(template: Path, root: Path, remote: Path) -> Workspace:
    """A copy of ``template`` at ``root`` whose default DVC remote is ``remote``."""
    shutil.copytree(template, root, symlinks=True)
    config = root / ".dvc" / "config"
    config.write_text(config.read_text().replace(str(template.parent / "dvc-remote"), str(remote)))
    return Workspace(root)


@pytest.fixture
def workspace(workspace_template: Path, tmp_path: Path) -> Workspace:
    return copy_workspace(workspace_template, tmp_path / "ws", tmp_path / "dvc-remote")


def file_tree(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (relative path -> bytes), to prove it unchanged byte for byte."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_class_folders(
    root: Path, counts: dict[str, int], size: tuple[int, int] = (12, 9), mode: str = "RGB", seed: int = 0
) -> list[Path]:
    """``root/<class>/<i>.png`` with ``counts[class]`` distinct random images of ``size`` and ``mode``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    written: list[Path] = []
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            bands = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
            pixels = rng.integers(0, 256, (size[1], size[0], bands), dtype=np.uint8)
            path = root / name / f"{i:03d}.png"
            Image.fromarray(pixels[..., 0] if bands == 1 else pixels).save(path)
            written.append(path)
    return written


@pytest.fixture
def single_thread_torch():
    """One intra-op thread for tests on tiny tensors: with two threads on a busy 2-core machine,
    OpenMP's spinning barriers make each small op 10-20x slower; one thread loses nothing here."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass(frozen=True)
class S3Bucket:
    """A fresh bucket on the test S3 server; ``env`` is what clients need (also set in os.environ)."""

    name: str
    endpoint: str
    env: dict[str, str]

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.name}", *parts])

    def keys(self, prefix: str) -> set[str]:
        """The keys under ``prefix`` (relative to it), listed with boto3 without reading any object."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, **S3_CLIENT)
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        return {o["Key"].removeprefix(prefix) for page in pages for o in page.get("Contents", [])}

    def objects(self, prefix: str) -> dict[str, bytes]:
        """Every object under ``prefix`` (key relative to it -> bytes), read with boto3, not with visionops."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, **S3_CLIENT)
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        found = {}
        for key in keys:
            try:
                found[key.removeprefix(prefix)] = client.get_object(Bucket=self.name, Key=key)["Body"].read()
            except client.exceptions.NoSuchKey:  # deleted since the listing (a lease released meanwhile)
                continue
        return found


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One real S3 API server (moto, in a child process on 127.0.0.1) for the whole session."""
    server = S3Server()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Bucket:
    """A new bucket, with the endpoint and dummy credentials in the environment for every client:
    s3fs in this process, and DVC or visionops in child processes."""
    name = f"visionops-{uuid.uuid4().hex[:12]}"
    s3_server.make_bucket(name)
    env = s3_server.client_env(tmp_path / "aws")
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return S3Bucket(name, s3_server.endpoint, env)


def ingest_bounds(**overrides: float) -> IngestParams:
    """data.ingest as the project's params.yaml has it, with ``overrides`` (e.g. shard_mb=0.01)."""
    from dataclasses import replace

    from tasks.params import load

    return replace(load(PROJECT / "params.yaml").data.ingest, **overrides)


def collect(dataset: RawDataset) -> dict[str, list[RawImage]]:
    """Every image a source streams, per split, in the order streamed (tests hold tiny datasets)."""
    splits: dict[str, list[RawImage]] = {"train": [], "test": []}
    for split, image in dataset.images():
        splits[split].append(image)
    return splits


def write_raw(data: Path, splits: dict[str, list[RawImage]], **bounds: float) -> None:
    """data/ as ingest writes it (shards and source.json) for images held in memory."""
    from tasks.ingest import write_data

    data.mkdir(parents=True, exist_ok=True)
    write_data(RawDataset.of("test", splits), data, ingest_bounds(**bounds))


def sideways_photo() -> tuple[bytes, Any]:
    """A JPEG stored sideways with EXIF orientation 6 ("rotate 90 clockwise to view"), and the
    upright pixels a viewer shows: the red top half as stored is the right half as viewed."""
    import io

    import numpy as np
    from PIL import Image

    stored = np.zeros((8, 16, 3), np.uint8)  # 16 wide, 8 high
    stored[:4] = (255, 0, 0)  # top half red
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=100, exif=exif)
    upright = np.rot90(stored, k=-1)  # 8 wide, 16 high: the red half is now on the right
    return buf.getvalue(), upright
