"""tasks/ingest.py in a real git+DVC workspace: atomic swap, dvc add + push, reproducible bytes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tasks.data.raw import read_split
from tasks.errors import DataError, RuntimeUnavailable
from tasks.ingest import STAGING_PREFIX, ingest
from tasks.params import DataParams, SyntheticParams
from tasks.paths import Workspace

from conftest import PROJECT, run, write_class_folders


def _params(seed: int = 0) -> DataParams:
    return DataParams("synthetic", 32, 3, 0.25, seed, SyntheticParams(2, 3, 2))


def _snapshot(ws: Workspace) -> dict[str, bytes]:
    files = {p.relative_to(ws.root).as_posix(): p.read_bytes() for p in ws.data.iterdir()}
    files["data.dvc"] = (ws.root / "data.dvc").read_bytes()
    return files


@pytest.mark.integration
def test_ingest_versions_pushes_and_keeps_the_previous_version_on_failure(
    workspace: Workspace, tmp_path: Path
) -> None:
    # One workspace for the whole life cycle: every DVC call costs seconds.
    result = ingest(_params(), workspace)
    assert result.changed and result.md5 and result.md5.endswith(".dir")
    assert sorted(p.name for p in workspace.data.iterdir()) == ["source.json", "test.parquet", "train.parquet"]
    table = read_split(workspace.raw_split("train"))
    assert table.column_names == ["path", "class_name", "image"] and table.num_rows == 6
    source = json.loads(workspace.data_source.read_text())
    assert source["source"] == "synthetic" and source["counts"]["test"] == {"disk": 2, "square": 2}
    assert "/data" in (workspace.root / ".gitignore").read_text()
    status = run(["dvc", "status", "--cloud", "data.dvc"], workspace.root).stdout
    assert "in sync" in status, status  # pushed to the default remote

    before = _snapshot(workspace)
    again = ingest(_params(), workspace)
    assert not again.changed
    assert _snapshot(workspace) == before  # identical content: data.dvc byte for byte the same

    with pytest.raises(DataError, match="not found"):
        ingest(_params(), workspace, source=str(tmp_path / "missing"))
    assert _snapshot(workspace) == before

    run(["dvc", "remote", "modify", "local", "url", "/dev/null/remote"], workspace.root)
    with pytest.raises(RuntimeUnavailable, match="dvc push"):
        ingest(_params(seed=3), workspace)  # new content, but the push fails
    assert _snapshot(workspace) == before
    assert not list(workspace.root.glob(STAGING_PREFIX + "*"))


@pytest.mark.integration
def test_fresh_clone_pulls_data_byte_for_byte(workspace: Workspace, tmp_path: Path) -> None:
    write_class_folders(tmp_path / "folders", {"a": 3, "b": 3}, mode="RGBA")
    first = ingest(_params(), workspace, source=str(tmp_path / "folders"))
    run(["git", "add", "-A"], workspace.root)
    run(["git", "commit", "-qm", "data"], workspace.root)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(workspace.root), str(clone)], tmp_path)
    run(["dvc", "pull", "-q", "data.dvc"], clone)
    original = {p.name: p.read_bytes() for p in workspace.data.iterdir()}
    assert {p.name: p.read_bytes() for p in (clone / "data").iterdir()} == original
    # A different version, then back: data.dvc returns to the same bytes.
    assert ingest(_params(seed=1), workspace).md5 != first.md5
    assert ingest(_params(), workspace, source=str(tmp_path / "folders")).md5 == first.md5


@pytest.mark.integration
def test_first_ingest_that_fails_leaves_no_data(workspace: Workspace) -> None:
    run(["dvc", "remote", "modify", "local", "url", "/dev/null/remote"], workspace.root)
    with pytest.raises(RuntimeUnavailable):
        ingest(_params(), workspace)
    assert not workspace.data.exists() and not (workspace.root / "data.dvc").exists()


def test_not_a_dvc_repository_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a DVC repository"):
        ingest(_params(), Workspace(tmp_path))
    assert not (tmp_path / "data").exists()


@pytest.mark.integration
def test_module_entry_names_a_bad_source(tmp_path: Path) -> None:
    shutil.copy(PROJECT / "params.yaml", tmp_path / "params.yaml")
    proc = run(["python", "-m", "tasks.ingest", "--source", "no/such/dir"], tmp_path, check=False, env=None)
    assert proc.returncode == 1
    assert "no/such/dir not found" in proc.stderr
