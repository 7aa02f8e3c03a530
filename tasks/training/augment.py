"""Augmentation on the training device, vectorised per batch, and the per-channel statistics.

Crop (with reflect padding) and flip are one index computation and one gather for the whole
batch, cutout one mask; the ImageNet-style random-resized crop is one affine sampling grid. No
per-sample Python. The batches come from tasks/training/splits.py, whole-split or streamed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tasks.data.prepared import Images, image_batches
from tasks.params import AugmentParams, ConfigError

# Bytes of uint8 pixels per chunk when computing statistics: the float64 temporaries are 8x that.
_STATS_CHUNK_BYTES = 2 << 20
# A constant channel has std 0; dividing by it would turn the whole channel into inf/NaN.
_MIN_STD = 1e-3


def channel_stats(images: Images) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 (N, C, H, W) images, on the 0..1 scale, read in chunks."""
    n, channels, height, width = images.shape
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    chunk_images = max(1, _STATS_CHUNK_BYTES // (channels * height * width))
    for chunk in image_batches(images, chunk_images, "channel statistics"):
        x = torch.from_numpy(chunk).to(torch.float64) / 255.0
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
    count = n * height * width
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt().clamp_min(_MIN_STD)
    return [float(v) for v in mean], [float(v) for v in std]


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Map indices in [-size+1, 2*size-2] into [0, size) as reflect padding does (no edge repeat)."""
    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def random_resized_crop(images: torch.Tensor, a: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    """ImageNet-style crop of a (B, C, H, W) batch, resized back to H x W (bilinear), float 0..255.

    Each sample's crop covers a uniform share in ``a.crop_scale`` of the area with a log-uniform
    aspect ratio in ``a.crop_ratio``, at a uniform position. Where torchvision retries a crop that
    does not fit, the side is clipped to the image instead: one draw per sample, no loop. A flip
    (``a.flip``) mirrors the sampling grid, so it costs nothing extra.
    """
    batch, _, height, width = images.shape
    device = images.device
    draws = torch.rand(5, batch, generator=generator, device=device, dtype=torch.float64)
    low, high = a.crop_scale
    area = height * width * (low + (high - low) * draws[0])
    log_low, log_high = math.log(a.crop_ratio[0]), math.log(a.crop_ratio[1])
    ratio = torch.exp(log_low + (log_high - log_low) * draws[1])
    crop_w = torch.sqrt(area * ratio).clamp(max=width)
    crop_h = torch.sqrt(area / ratio).clamp(max=height)
    centre_x = crop_w / 2 + (width - crop_w) * draws[2]
    centre_y = crop_h / 2 + (height - crop_h) * draws[3]
    mirror = torch.where(draws[4] < 0.5, -1.0, 1.0) if a.flip else torch.ones_like(crop_w)
    # affine_grid maps output coordinates in [-1, 1] to input coordinates in [-1, 1] (pixel edges).
    theta = torch.zeros(batch, 2, 3, dtype=torch.float64, device=device)
    theta[:, 0, 0] = mirror * crop_w / width
    theta[:, 0, 2] = 2 * centre_x / width - 1
    theta[:, 1, 1] = crop_h / height
    theta[:, 1, 2] = 2 * centre_y / height - 1
    grid = F.affine_grid(theta.float(), list(images.shape), align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def augment(images: torch.Tensor, a: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    """Random crop (padded, or random-resized), horizontal flip and cutout of a (B, C, H, W) batch.

    Padding is never materialised: each sample's crop offset is folded into the row and column
    indices (reflected at the border), and a flip reverses its column indices. uint8 in, uint8
    out; the random-resized crop interpolates, so it returns float32 on the 0..255 scale.
    """
    batch, channels, height, width = images.shape
    device = images.device
    if a.random_resized_crop:
        return _cutout(random_resized_crop(images, a, generator), a.cutout, generator)
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
    return _cutout(images, a.cutout, generator)


def _cutout(images: torch.Tensor, side: int, generator: torch.Generator) -> torch.Tensor:
    """Erase one ``side`` x ``side`` square per image (0 = off).

    The square's centre is uniform over the image, so it may be partly outside (as in DeVries &
    Taylor); erased pixels become black.
    """
    if side <= 0:
        return images
    batch, _, height, width = images.shape
    device = images.device
    centre = torch.stack(
        [
            torch.randint(0, height, (batch,), generator=generator, device=device),
            torch.randint(0, width, (batch,), generator=generator, device=device),
        ]
    )
    top = centre[0, :, None] - side // 2
    left = centre[1, :, None] - side // 2
    ys = torch.arange(height, device=device)
    xs = torch.arange(width, device=device)
    in_rows = (ys >= top) & (ys < top + side)
    in_cols = (xs >= left) & (xs < left + side)
    erase = in_rows[:, None, :, None] & in_cols[:, None, None, :]
    return images.masked_fill(erase, 0)
