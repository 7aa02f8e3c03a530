"""tasks/data/versioning.py: the real dvc command, its errors turned into messages that say what to do."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.data.versioning import add, run_dvc, tracked_md5
from tasks.errors import DataError
from tasks.paths import Workspace


def test_tracked_md5_reads_a_dvc_file(tmp_path: Path) -> None:
    (tmp_path / "data.dvc").write_text("outs:\n- md5: abc.dir\n  path: data\n")
    assert tracked_md5(tmp_path / "data.dvc") == "abc.dir"
    assert tracked_md5(tmp_path / "missing.dvc") is None


def test_outside_a_dvc_repository_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"not a DVC repository: run `git init && dvc init`"):
        run_dvc(Workspace(tmp_path), "status")


@pytest.mark.integration
def test_dvc_failure_quotes_dvc(workspace: Workspace) -> None:
    with pytest.raises(DataError, match=r"`dvc add --quiet nothing-here` failed .*exit 1"):
        add(workspace, workspace.root / "nothing-here")
