"""tasks/prepare.py: data/ decoded once into uint8 tensors plus a manifest; corrupt files reported."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks import prepare as prepare_module
from tasks.data import raw as rawdata
from tasks.data.imaging import encode_png, to_array
from tasks.data.raw import RawImage, write_split
from tasks.data.reports import PrepareReport, SplitCounts
from tasks.errors import DataError
from tasks.params import DataParams, SyntheticParams
from tasks.paths import Workspace
from tasks.prepare import prepare

from candidate_factory import write_params
from conftest import run

P = DataParams("synthetic", 8, 3, 0.25, 0, SyntheticParams(2, 2, 2))


def _png(seed: int, size: tuple[int, int] = (10, 6)) -> bytes:
    return encode_png(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _workspace(tmp_path: Path, train: list[RawImage], test: list[RawImage]) -> Workspace:
    ws = Workspace(tmp_path)
    ws.data.mkdir(parents=True)
    write_split(train, ws.raw_split("train"))
    write_split(test, ws.raw_split("test"))
    return ws


def test_tensors_labels_classes_and_manifest(tmp_path: Path) -> None:
    train = [RawImage(f"train/{c}/{i}.png", c, _png(10 * k + i)) for k, c in enumerate("ba") for i in range(3)]
    test = [RawImage("test/a/0.png", "a", _png(99, size=(5, 5)))]
    ws = _workspace(tmp_path, train, test)
    result = prepare(P, ws)
    assert result.counts["train"] == SplitCounts(images=6, decoded=6, corrupt=0)
    images = np.load(ws.images("train"))
    assert images.shape == (6, 3, 8, 8) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[0], to_array(train[0].image, 8, 3))
    labels = np.load(ws.labels("train"))
    assert labels.dtype == np.int64 and labels.tolist() == [1, 1, 1, 0, 0, 0]
    assert json.loads(ws.classes.read_text()) == ["a", "b"]
    manifest = pd.read_parquet(ws.manifest)
    assert list(manifest.columns) == prepare_module.MANIFEST_SCHEMA.names
    row = manifest[manifest["split"] == "test"].iloc[0]
    assert (row["path"], row["height"], row["width"], row["channels"], row["label"]) == ("test/a/0.png", 5, 5, 3, 0)
    assert 0 < row["mean"] < 1 and 0 < row["std"] < 1
    assert manifest["content_hash"].str.len().eq(32).all()


def test_corrupt_files_are_reported_by_path_not_fatal(tmp_path: Path) -> None:
    good = _png(1)
    train = [
        RawImage("train/a/ok.png", "a", good),
        RawImage("train/a/truncated.png", "a", good[: len(good) // 2]),
        RawImage("train/b/text.png", "b", b"hello, I am text\n"),
        RawImage("train/b/ok.png", "b", _png(2)),
    ]
    ws = _workspace(tmp_path, train, [RawImage("test/a/1.png", "a", _png(3))])
    result = prepare(P, ws)
    assert sorted(c.path for c in result.corrupt) == ["train/a/truncated.png", "train/b/text.png"]
    assert PrepareReport.read(ws.prepare_report, "prepare") == result
    assert result.corrupt_count == 2 and result.counts["train"].decoded == 2
    assert np.load(ws.images("train")).shape[0] == 2
    manifest = pd.read_parquet(ws.manifest).set_index("path")
    assert not manifest.loc["train/b/text.png", "decoded"]
    assert "undecodable" in manifest.loc["train/b/text.png", "error"]
    assert manifest.loc["train/b/ok.png", "index"] == 1  # row in the tensor file, skipping the corrupt ones
    assert np.load(ws.labels("train")).tolist() == [0, 1]


def test_grayscale_output_and_any_input_size(tmp_path: Path) -> None:
    train = [RawImage(f"a/{i}.png", "a", _png(i, size=(3 + i, 40))) for i in range(3)]
    ws = _workspace(tmp_path, train, train[:1])
    prepare(replace(P, channels=1, image_size=16), ws)
    assert np.load(ws.images("train")).shape == (3, 1, 16, 16)


def test_process_pool_gives_the_same_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train = [RawImage(f"a/{i}.png", "a", _png(i)) for i in range(40)] + [RawImage("a/bad.png", "a", b"x")]
    ws = _workspace(tmp_path / "one", train, train[:2])
    prepare(P, ws)
    monkeypatch.setattr(prepare_module, "POOL_MIN", 10)
    monkeypatch.setattr(rawdata, "ROW_GROUP", 7)  # 6 row groups, decoded by 2 worker processes
    pooled = _workspace(tmp_path / "pool", train, train[:2])
    assert len(rawdata.row_groups(pooled.raw_split("train"))[0]) == 6
    prepare(P, pooled)
    np.testing.assert_array_equal(np.load(ws.images("train")), np.load(pooled.images("train")))
    pd.testing.assert_frame_equal(pd.read_parquet(ws.manifest), pd.read_parquet(pooled.manifest))


def test_missing_data_says_to_ingest(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="run `visionops ingest`"):
        prepare(P, Workspace(tmp_path))


@pytest.mark.integration
def test_dvc_repro_after_data_source_changed_without_ingest_says_to_ingest(workspace: Workspace) -> None:
    write_params(workspace, {"data.synthetic.train_per_class": 3, "data.synthetic.test_per_class": 2})
    run(["visionops", "ingest"], workspace.root)
    run(["dvc", "repro", "prepare"], workspace.root)
    write_params(workspace, {"data.source": "cifar10"})  # edited by hand; nobody ran `visionops ingest`
    proc = run(["dvc", "repro", "prepare"], workspace.root, check=False)
    assert proc.returncode != 0, "dvc repro prepared the old data for a new source: " + proc.stdout
    output = proc.stdout + proc.stderr
    assert "data.source: cifar10, but data/ holds synthetic" in output and "run `visionops ingest`" in output
