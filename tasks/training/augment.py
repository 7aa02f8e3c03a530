"""The training input pipeline, on the training device and vectorised per batch.

A split is held once as a uint8 tensor on the device (CIFAR-10's 50,000 images are 150 MB).
Each batch is a single random permutation slice; crop (with reflect padding) and flip are one
index computation and one gather for the whole batch, cutout one mask; no per-sample Python.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from tasks.params import AugmentParams, ConfigError
from tasks.training.models import normalize

# Images per chunk when computing statistics: bounds float64 temporaries to ~100 MB at 32 px.
_STATS_CHUNK = 4096
# A constant channel has std 0; dividing by it would turn the whole channel into inf/NaN.
_MIN_STD = 1e-3


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 (N, C, H, W) images, on the 0..1 scale."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64, device=images.device)
    total_sq = torch.zeros_like(total)
    for start in range(0, images.shape[0], _STATS_CHUNK):
        chunk = images[start : start + _STATS_CHUNK].to(torch.float64) / 255.0
        total += chunk.sum(dim=(0, 2, 3))
        total_sq += (chunk * chunk).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt().clamp_min(_MIN_STD)
    return [float(v) for v in mean.cpu()], [float(v) for v in std.cpu()]


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Map indices in [-size+1, 2*size-2] into [0, size) as reflect padding does (no edge repeat)."""
    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def augment(images: torch.Tensor, a: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    """Random crop with reflect padding, horizontal flip and cutout of a uint8 (B, C, H, W) batch.

    Padding is never materialised: each sample's crop offset is folded into the row and column
    indices (reflected at the border), and a flip reverses its column indices.
    """
    batch, channels, height, width = images.shape
    device = images.device
    rows = torch.arange(height, device=device).expand(batch, height)
    cols = torch.arange(width, device=device).expand(batch, width)
    pad = a.crop_padding
    if pad > 0:
        if pad >= min(height, width):
            raise ConfigError(f"train.augment.crop_padding={pad} must be smaller than the image ({height}x{width})")
        shift = torch.randint(-pad, pad + 1, (2, batch, 1), generator=generator, device=device)
        rows = _reflect(rows + shift[0], height)
        cols = _reflect(cols + shift[1], width)
    if a.flip:
        flipped = torch.rand(batch, 1, generator=generator, device=device) < 0.5
        cols = torch.where(flipped, cols.flip(1), cols)
    if pad > 0 or a.flip:
        # One gather over flattened pixels of an NHWC view: a channels_last batch needs no copy,
        # and the result is channels_last, the layout the convolutions want.
        pixels = images.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        source = (rows[:, :, None] * width + cols[:, None, :]).reshape(batch, height * width, 1)
        pixels = pixels.gather(1, source.expand(batch, height * width, channels))
        images = pixels.view(batch, height, width, channels).permute(0, 3, 1, 2)
    if a.cutout > 0:
        # The square's centre is uniform over the image, so it may be partly outside (as in DeVries &
        # Taylor); erased pixels become black.
        centre = torch.stack(
            [
                torch.randint(0, height, (batch,), generator=generator, device=device),
                torch.randint(0, width, (batch,), generator=generator, device=device),
            ]
        )
        top = centre[0, :, None] - a.cutout // 2
        left = centre[1, :, None] - a.cutout // 2
        ys = torch.arange(height, device=device)
        xs = torch.arange(width, device=device)
        in_rows = (ys >= top) & (ys < top + a.cutout)
        in_cols = (xs >= left) & (xs < left + a.cutout)
        erase = in_rows[:, None, :, None] & in_cols[:, None, None, :]
        images = images.masked_fill(erase, 0)
    return images


@dataclass
class DeviceSplit:
    """One split as uint8 images and int64 labels on the training device, served in batches."""

    images: torch.Tensor  # uint8 (N, C, H, W), channels_last in memory
    labels: torch.Tensor  # int64 (N,)
    mean: torch.Tensor  # float32 (1, C, 1, 1), 0..1 scale
    std: torch.Tensor

    @classmethod
    def from_arrays(
        cls,
        images: np.ndarray,
        labels: np.ndarray,
        mean: list[float],
        std: list[float],
        device: torch.device,
    ) -> DeviceSplit:
        stats = [torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1) for v in (mean, std)]
        return cls(
            images=torch.from_numpy(images).to(device).contiguous(memory_format=torch.channels_last),
            labels=torch.from_numpy(labels.astype(np.int64)).to(device),
            mean=stats[0],
            std=stats[1],
        )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        # channels_last: the layout cuDNN's (and oneDNN's) fastest convolutions want.
        return normalize(images, self.mean, self.std).contiguous(memory_format=torch.channels_last)

    def train_batches(
        self, batch_size: int, a: AugmentParams, generator: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled, augmented, normalised batches; the last partial batch is dropped (BatchNorm
        needs more than one sample, and the next epoch's permutation covers those images)."""
        order = torch.randperm(len(self), generator=generator, device=self.images.device)
        for start in range(0, len(self) - batch_size + 1, batch_size):
            index = order[start : start + batch_size]
            yield self._prepare(augment(self.images[index], a, generator)), self.labels[index]

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every image once, in order, normalised, not augmented."""
        for start in range(0, len(self), batch_size):
            yield self._prepare(self.images[start : start + batch_size]), self.labels[start : start + batch_size]
