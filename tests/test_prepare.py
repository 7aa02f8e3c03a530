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
from tasks.data.raw import RawImage
from tasks.data.reports import PrepareReport, SplitCounts
from tasks.errors import DataError
from tasks.params import DataParams, SyntheticParams
from tasks.paths import Workspace
from tasks.prepare import prepare

from candidate_factory import write_params
from conftest import ingest_bounds, run, write_raw

P = DataParams("synthetic", 8, 3, 0.25, 0, SyntheticParams(2, 2, 2), ingest_bounds())


def _png(seed: int, size: tuple[int, int] = (10, 6)) -> bytes:
    return encode_png(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _workspace(tmp_path: Path, train: list[RawImage], test: list[RawImage], **bounds: float) -> Workspace:
    ws = Workspace(tmp_path)
    write_raw(ws.data, {"train": train, "test": test}, **bounds)
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
    train = [RawImage(f"{'ab'[i % 2]}/{i}.png", "ab"[i % 2], _png(i, size=(3 + i, 40))) for i in range(3)]
    ws = _workspace(tmp_path, train, train[:2])
    prepare(replace(P, channels=1, image_size=16), ws)
    assert np.load(ws.images("train")).shape == (3, 1, 16, 16)


@pytest.mark.integration  # starts worker processes
def test_process_pool_over_shards_gives_the_same_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train = [RawImage(f"a/{i}.png", "a", _png(i)) for i in range(40)] + [RawImage("a/bad.png", "a", b"x")]
    train += [RawImage(f"b/{i}.png", "b", _png(100 + i)) for i in range(3)]
    ws = _workspace(tmp_path / "one", train, train[:2])
    prepare(P, ws)
    monkeypatch.setattr(prepare_module, "POOL_MIN", 10)
    monkeypatch.setattr(prepare_module, "DECODE_BATCH", 3)  # several writes per row group
    # ~200-byte PNGs: row groups of ~6 images, shards of ~3 groups, decoded by a pool of 2 processes
    pooled = _workspace(tmp_path / "pool", train, train[:2], row_group_mb=0.001, shard_mb=0.003)
    assert len(rawdata.shards(pooled.data, "train")) >= 3 and len(rawdata.row_groups(pooled.data, "train")) >= 6
    prepare(P, pooled)
    np.testing.assert_array_equal(np.load(ws.images("train")), np.load(pooled.images("train")))
    np.testing.assert_array_equal(np.load(ws.labels("train")), np.load(pooled.labels("train")))
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


def test_arrays_are_npy_files_a_reader_can_memory_map(tmp_path: Path) -> None:
    train = [RawImage(f"{c}/{i}.png", c, _png(10 * k + i)) for k, c in enumerate("ab") for i in range(3)]
    ws = _workspace(tmp_path, train, train[:2])
    prepare(P, ws)
    mapped = np.load(ws.images("train"), mmap_mode="r")
    assert isinstance(mapped, np.memmap) and mapped.shape == (6, 3, 8, 8)
    np.testing.assert_array_equal(mapped[5], to_array(train[5].image, 8, 3))


def test_exif_orientation_is_the_same_in_prepare_and_predict(tmp_path: Path) -> None:
    from tasks.predict import load_images

    from conftest import sideways_photo

    photo, _upright = sideways_photo()
    train = [RawImage("a/photo.jpg", "a", photo), RawImage("b/0.png", "b", _png(1))]
    ws = _workspace(tmp_path, train, train)
    prepare(P, ws)
    (tmp_path / "photo.jpg").write_bytes(photo)
    served = load_images([tmp_path / "photo.jpg"], 8, 3)[0][0]
    np.testing.assert_array_equal(np.load(ws.images("train"))[0], served)
    row = pd.read_parquet(ws.manifest).iloc[0]
    assert (row["path"], row["height"], row["width"]) == ("a/photo.jpg", 16, 8)  # upright: 8 wide, 16 high
    assert served[0, :, 6:].mean() > 200 and served[0, :, :2].mean() < 50  # red on the right, as a viewer shows


def _broken_shard(ws: Workspace) -> Path:
    """The last shard of train with a byte range inside its data pages overwritten."""
    shard = rawdata.shards(ws.data, "train")[-1]
    raw = bytearray(shard.read_bytes())
    raw[8:200] = b"\xff" * 192  # page headers and image bytes of the first row group; the footer stays valid
    shard.write_bytes(bytes(raw))
    return shard


def test_a_broken_parquet_file_is_named_and_nothing_is_left_behind(tmp_path: Path) -> None:
    train = [RawImage(f"{c}/{i}.png", c, _png(10 * k + i)) for k, c in enumerate("ab") for i in range(4)]
    ws = _workspace(tmp_path, train, train[:2])
    shard = _broken_shard(ws)
    with pytest.raises(DataError, match=rf"{shard.name}.*: unreadable Parquet .*data/ is damaged: restore it"):
        prepare(P, ws)
    assert not ws.prepared.exists()
    assert not list(ws.staging.glob("prepare-*"))


@pytest.mark.integration
def test_module_entry_reports_a_broken_parquet_file_in_one_line(tmp_path: Path) -> None:
    import shutil

    from conftest import PROJECT, run

    train = [RawImage(f"{c}/{i}.png", c, _png(10 * k + i)) for k, c in enumerate("ab") for i in range(4)]
    ws = _workspace(tmp_path, train, train[:2])
    shutil.copy(PROJECT / "params.yaml", ws.params_file)
    write_params(ws, {"data.source": "test"})  # the source write_raw's data/ says it holds
    shard = _broken_shard(ws)
    proc = run(["python", "-m", "tasks.prepare"], ws.root, check=False)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("visionops: error: ")]
    assert len(errors) == 1 and shard.name in errors[0] and "dvc checkout data.dvc" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.integration  # kills a real prepare process
def test_a_killed_prepare_leaves_no_work_folder_past_the_next_run(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    train = [RawImage(f"{'ab'[i % 2]}/{i}.png", "ab"[i % 2], _png(i, size=(64, 64))) for i in range(400)]
    ws = _workspace(tmp_path, train, train[:40])
    code = (
        "import sys; from tasks.prepare import prepare; from tasks.params import *; from tasks.paths import Workspace;"
        "from pathlib import Path; import tasks.data.imaging as im; import time;"
        "slow = im.decode; im.decode = lambda b: (time.sleep(0.01), slow(b))[1];"  # keep it running while we kill it
        f"prepare(DataParams('x', 64, 3, 0.2, 0, SyntheticParams(2, 1, 1), {P.ingest!r}), Workspace(Path(sys.argv[1])))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(ws.root)], cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 60
    while not list(ws.staging.glob("prepare-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = [p for p in ws.staging.glob("prepare-*") if p.is_dir()]
    assert left, "the killed prepare should have left its work folder (or it never started)"
    prepare(P, ws)
    assert not list(ws.staging.glob("prepare-*")), "the next run removes what a killed run left"
    assert np.load(ws.images("train")).shape[0] == 400
