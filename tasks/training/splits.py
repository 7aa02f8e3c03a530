"""The training data the epoch loop draws from: a whole split held on the device, or streamed.

Both placements serve the same `TrainingSplit` interface and the same batches: the rows come from
`EpochSampler`, and augmentation and normalisation (`Preprocess`) run on the device in both. A
`DeviceSplit` holds the split as one uint8 tensor on the device (CIFAR-10's 50,000 images are
150 MB): fastest, and the default while it fits ``train.device_budget_gb``. A `StreamedSplit`
reads each batch's rows from the prepared file in a background thread (pinned, copied with
``non_blocking`` on CUDA), so memory holds a few batches whatever the size of the split.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch

from tasks.data.prepared import PreparedImages, PreparedSplit, image_batches
from tasks.params import AugmentParams
from tasks.training.augment import augment
from tasks.training.models import eval_resize_crop, normalize
from tasks.training.prefetch import read_ahead, to_device

log = logging.getLogger(__name__)

Placement = Literal["device", "streamed"]
Batch = tuple[torch.Tensor, torch.Tensor]  # float images (B, C, H, W) channels_last, int64 labels (B,)

_FILL_CHUNK_BYTES = 64 << 20  # bytes per copy when filling a DeviceSplit (host memory held at once)


def placement(choice: str, budget_gb: float, nbytes: int) -> Placement:
    """``train.data_on_device`` (auto | always | never) for data of ``nbytes`` pixels."""
    if choice == "always":
        return "device"
    if choice == "never":
        return "streamed"
    return "device" if nbytes <= budget_gb * 1e9 else "streamed"


@dataclass(frozen=True)
class Preprocess:
    """uint8 batches -> model inputs on the device: augmented for training, the eval view otherwise."""

    mean: torch.Tensor  # float32 (1, C, 1, 1), 0..1 scale
    std: torch.Tensor
    eval_crop: float  # train.augment.eval_crop

    @classmethod
    def on(cls, device: torch.device, mean: Sequence[float], std: Sequence[float], eval_crop: float) -> Preprocess:
        stats = [torch.tensor(list(v), dtype=torch.float32, device=device).view(1, -1, 1, 1) for v in (mean, std)]
        return cls(stats[0], stats[1], eval_crop)

    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        # channels_last: the layout cuDNN's (and oneDNN's) fastest convolutions want.
        return normalize(images, self.mean, self.std).contiguous(memory_format=torch.channels_last)

    def train_view(self, images: torch.Tensor, a: AugmentParams, generator: torch.Generator) -> torch.Tensor:
        # One layout in, whichever placement the batch came from: augmentation then gives equal numbers.
        images = images.contiguous(memory_format=torch.channels_last)
        return self._inputs(augment(images, a, generator))

    def eval_view(self, images: torch.Tensor) -> torch.Tensor:
        return self._inputs(eval_resize_crop(images, self.eval_crop))


class TrainingSplit(Protocol):
    """One split as the epoch loop sees it; `DeviceSplit` and `StreamedSplit` serve the same batches."""

    device: torch.device

    def __len__(self) -> int: ...

    def train_batches(
        self, rows: Sequence[torch.Tensor], a: AugmentParams, generator: torch.Generator
    ) -> Iterator[Batch]:
        """For each entry of ``rows`` (from `EpochSampler`), those images augmented and their labels."""
        ...

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        """Every image once, in order, in its evaluation view."""
        ...


@dataclass
class DeviceSplit:
    """The whole split as uint8 images (channels_last) and int64 labels on the device."""

    images: torch.Tensor
    labels: torch.Tensor
    preprocess: Preprocess
    device: torch.device

    @classmethod
    def load(cls, split: PreparedSplit, preprocess: Preprocess, device: torch.device) -> DeviceSplit:
        """Read ``split`` onto ``device`` in chunks (host memory holds one chunk beyond the split itself)."""
        n, c, h, w = split.images.shape
        images = torch.empty((n, c, h, w), dtype=torch.uint8, device=device, memory_format=torch.channels_last)
        chunk = max(1, _FILL_CHUNK_BYTES // split.images.image_bytes)
        start = 0
        for part in image_batches(split.images, chunk, f"loading {split.images.path.name} onto {device.type}"):
            images[start : start + len(part)].copy_(torch.from_numpy(part))
            start += len(part)
        return cls(images, torch.from_numpy(split.labels).to(device), preprocess, device)

    @classmethod
    def from_arrays(
        cls, images: np.ndarray, labels: np.ndarray, preprocess: Preprocess, device: torch.device
    ) -> DeviceSplit:
        """An in-memory split (benchmarks, tests)."""
        held = torch.from_numpy(images).to(device).contiguous(memory_format=torch.channels_last)
        return cls(held, torch.from_numpy(labels.astype(np.int64)).to(device), preprocess, device)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def train_batches(self, rows: Sequence[torch.Tensor], a: AugmentParams, generator: torch.Generator) -> Iterator[
        Batch
    ]:
        for index in rows:
            yield self.preprocess.train_view(self.images[index], a, generator), self.labels[index]

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        for start in range(0, len(self), batch_size):
            end = start + batch_size
            yield self.preprocess.eval_view(self.images[start:end]), self.labels[start:end]


@dataclass
class StreamedSplit:
    """The split read batch by batch from its prepared file, ``prefetch`` batches ahead."""

    images: PreparedImages
    labels: torch.Tensor  # int64 (N,), on the host
    preprocess: Preprocess
    device: torch.device
    prefetch: int  # train.prefetch_batches

    @classmethod
    def open(cls, split: PreparedSplit, preprocess: Preprocess, device: torch.device, prefetch: int) -> StreamedSplit:
        return cls(split.images, torch.from_numpy(split.labels), preprocess, device, prefetch)

    def __len__(self) -> int:
        return len(self.images)

    def _host_batch(self, n: int, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """An empty image buffer of ``n`` images, and ``labels``: pinned (page-locked) on CUDA, the
        only host memory that copies to the GPU asynchronously. The tensors themselves travel on:
        the caching host allocator then keeps a buffer until its copy has finished."""
        pinned = self.device.type == "cuda"
        images = torch.empty((n, *self.images.shape[1:]), dtype=torch.uint8, pin_memory=pinned)
        return images, labels.pin_memory() if pinned else labels

    def _read_rows(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self._host_batch(len(rows), self.labels[torch.from_numpy(rows)])
        self.images.take(rows, out=images.numpy())
        return images, labels

    def _read_range(self, start: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = min(start + batch_size, len(self))
        images, labels = self._host_batch(end - start, self.labels[start:end])
        self.images.read(start, images.numpy())
        return images, labels

    def train_batches(self, rows: Sequence[torch.Tensor], a: AugmentParams, generator: torch.Generator) -> Iterator[
        Batch
    ]:
        # The reader thread indexes the file on the host: one copy (one sync on CUDA) for the epoch.
        host_rows = list(torch.stack(list(rows)).cpu().numpy()) if len(rows) else []
        batches = to_device(read_ahead(self._read_rows, host_rows, self.prefetch), self.device)
        for images, labels in batches:
            yield self.preprocess.train_view(images, a, generator), labels

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        starts = range(0, len(self), batch_size)
        reads = read_ahead(lambda start: self._read_range(start, batch_size), starts, self.prefetch)
        for images, labels in to_device(reads, self.device):
            yield self.preprocess.eval_view(images), labels


def open_split(
    split: PreparedSplit, where: Placement, preprocess: Preprocess, device: torch.device, prefetch: int
) -> TrainingSplit:
    """``split`` held on ``device`` or streamed from its file, as ``where`` says."""
    if where == "device":
        return DeviceSplit.load(split, preprocess, device)
    return StreamedSplit.open(split, preprocess, device, prefetch)
