"""tasks/training/splits.py: both placements serve the same batches; auto picks by the budget."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tasks import params
from tasks.data.prepared import load_split
from tasks.params import AugmentParams
from tasks.paths import Workspace
from tasks.training.sampler import EpochSampler
from tasks.training.splits import DeviceSplit, Preprocess, StreamedSplit, open_split, placement

pytestmark = pytest.mark.usefixtures("single_thread_torch")

PROJECT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _split(tmp_path: Path, n: int = 37, size: int = 8) -> Workspace:
    ws = Workspace(tmp_path)
    ws.prepared.mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.save(ws.images("train"), rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8))
    np.save(ws.labels("train"), rng.integers(0, 3, n).astype(np.int64))
    ws.classes.write_text(json.dumps(["a", "b", "c"]))
    return ws


def _augment(**changes: Any) -> AugmentParams:
    return dataclasses.replace(params.load(PROJECT / "params.yaml").train.augment, **changes)


def _preprocess(eval_crop: float = 1.0) -> Preprocess:
    return Preprocess.on(CPU, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3], eval_crop)


@pytest.mark.parametrize(
    "a",
    [
        _augment(crop_padding=2, flip=True, cutout=3),
        _augment(crop_padding=0, random_resized_crop=True, flip=True, cutout=2),
    ],
    ids=["padded-crop", "random-resized-crop"],
)
def test_device_and_streamed_splits_give_identical_training_batches(tmp_path: Path, a: AugmentParams) -> None:
    split = load_split(_split(tmp_path), "train")
    sampler = EpochSampler(len(split.labels), batch_size=8)
    epochs = []
    for held in (DeviceSplit.load(split, _preprocess(), CPU), StreamedSplit.open(split, _preprocess(), CPU, 2)):
        generator = torch.Generator().manual_seed(11)
        epochs.append(list(held.train_batches(sampler.batches(generator), a, generator)))
    device, streamed = epochs
    assert len(device) == len(streamed) == 4  # 37 images, batch 8: the partial batch is dropped
    for (x1, y1), (x2, y2) in zip(device, streamed, strict=True):
        assert torch.equal(y1, y2)
        assert torch.equal(x1, x2), "same rows, same augmentation draws, bit for bit"
        assert x1.is_contiguous(memory_format=torch.channels_last) and x2.dtype == torch.float32


def test_eval_batches_agree_and_cover_every_image_in_order(tmp_path: Path) -> None:
    split = load_split(_split(tmp_path, n=10), "train")
    device = DeviceSplit.load(split, _preprocess(0.875), CPU)
    streamed = StreamedSplit.open(split, _preprocess(0.875), CPU, 1)
    a, b = list(device.eval_batches(4)), list(streamed.eval_batches(4))
    assert [len(y) for _, y in a] == [len(y) for _, y in b] == [4, 4, 2]
    assert torch.equal(torch.cat([y for _, y in b]), torch.from_numpy(split.labels))
    for (x1, _), (x2, _) in zip(a, b, strict=True):
        assert torch.equal(x1, x2) and x1.shape[1:] == (3, 8, 8)


def test_streamed_split_keeps_a_bounded_number_of_batches_in_flight(tmp_path: Path) -> None:
    split = load_split(_split(tmp_path, n=64), "train")
    streamed = StreamedSplit.open(split, _preprocess(), CPU, prefetch=2)
    reads: list[int] = []
    real_take = split.images.take

    def counting_take(rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        reads.append(len(rows))
        return real_take(rows, out)

    split.images.take = counting_take  # type: ignore[method-assign]
    generator = torch.Generator().manual_seed(0)
    batches = streamed.train_batches(EpochSampler(64, 4).batches(generator), _augment(), generator)
    next(batches)
    deadline = threading.Event()
    deadline.wait(0.5)  # let the reader run as far ahead as it may
    # 1 consumed + 2 queued + at most 1 being read and waiting for queue space
    assert 3 <= len(reads) <= 4, reads
    del batches  # closing the generator stops its reader thread


def test_a_read_error_in_the_reader_thread_reaches_the_training_loop(tmp_path: Path) -> None:
    split = load_split(_split(tmp_path, n=16), "train")
    streamed = StreamedSplit.open(split, _preprocess(), CPU, prefetch=2)
    split.images.path.write_bytes(split.images.path.read_bytes()[:200])  # truncated under the reader
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(Exception, match="ended early"):
        list(streamed.train_batches(EpochSampler(16, 4).batches(generator), _augment(), generator))


def test_placement_follows_data_on_device_and_the_budget() -> None:
    gb = 10**9
    assert placement("auto", 2.0, 2 * gb) == "device"
    assert placement("auto", 2.0, 2 * gb + 1) == "streamed"
    assert placement("always", 0.0, 100 * gb) == "device"
    assert placement("never", 100.0, 1) == "streamed"


def test_open_split_gives_the_placement_asked_for(tmp_path: Path) -> None:
    split = load_split(_split(tmp_path), "train")
    assert isinstance(open_split(split, "device", _preprocess(), CPU, 2), DeviceSplit)
    assert isinstance(open_split(split, "streamed", _preprocess(), CPU, 2), StreamedSplit)
