"""The DVC remote on a real S3 API server (tests/s3_server.py): `visionops ingest` pushes each data
version to s3://<bucket>/dvc, and a fresh clone's `dvc pull data.dvc` gets it byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.paths import Workspace

from conftest import S3Bucket, file_tree, run, write_class_folders

pytestmark = pytest.mark.integration


def test_ingest_pushes_each_data_version_to_s3_and_a_fresh_clone_pulls_it_byte_identical(
    workspace: Workspace, s3_bucket: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a user types for an S3-compatible store (README): the endpoint lives in .dvc/config.
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    run(["dvc", "remote", "add", "-d", "storage", s3_bucket.url("dvc")], workspace.root)
    run(["dvc", "remote", "modify", "storage", "endpointurl", s3_bucket.endpoint], workspace.root)
    versions = []
    for shade, name in ((0, "v1"), (1, "v2")):
        folder = tmp_path / name
        write_class_folders(folder, {"dark": 12, "light": 12}, seed=shade)
        out = run(["visionops", "ingest", "--source", str(folder)], workspace.root).stdout
        assert "a new version" in out and "pushed to the DVC remote" in out
        run(["git", "add", "-A"], workspace.root)
        run(["git", "commit", "-qm", f"data {name}"], workspace.root)
        versions.append(file_tree(workspace.data))
    assert versions[0] != versions[1]
    stored = s3_bucket.objects("dvc/")
    assert stored and all(key.startswith("files/md5/") for key in stored)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(workspace.root), str(clone)], tmp_path)
    # data.dvc: the pipeline's own outputs are not pushed (a plain `dvc pull` also asks for them)
    run(["dvc", "pull", "data.dvc"], clone)
    assert file_tree(clone / "data") == versions[1]
    run(["git", "checkout", "-q", "HEAD~1"], clone)  # the first data version, from S3 as well
    run(["dvc", "pull", "data.dvc"], clone)
    assert file_tree(clone / "data") == versions[0]
