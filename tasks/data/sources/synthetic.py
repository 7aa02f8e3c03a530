"""A deterministic, learnable, offline dataset of procedurally drawn shapes and textures.

Each class is a pattern (disk, square, triangle, plus, ring, stripes in three orientations,
checkerboard, diagonal cross) drawn at a random position and scale, in random foreground and
background colours, with pixel noise. Colour carries no class information, so a model has to learn
shape. The same ``(params, seed)`` always gives the same PNG bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from tasks.data.imaging import encode_png
from tasks.data.raw import RawDataset, RawImage
from tasks.params import SyntheticParams
from tasks.paths import SPLITS

RENDER_SIZE = 32  # px; prepare resizes to data.image_size
NOISE_STD = 0.06  # pixel noise, on the 0..1 scale
MIN_LUMA_GAP = 0.3  # foreground/background brightness difference, 0..1: keeps shapes visible

# Each pattern maps centred coordinates (dx, dy), radius r and stripe period/phase (all shaped
# (N, 1, 1) or (N, H, W)) to a boolean foreground mask.
Mask = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _disk(dx, dy, r, x, y, period, phase):
    return dx**2 + dy**2 <= r**2


def _square(dx, dy, r, x, y, period, phase):
    return np.maximum(np.abs(dx), np.abs(dy)) <= 0.8 * r


def _triangle(dx, dy, r, x, y, period, phase):
    return (dy >= -r) & (dy <= 0.8 * r) & (np.abs(dx) <= 0.6 * (dy + r))


def _plus(dx, dy, r, x, y, period, phase):
    w = 0.3 * r
    return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))


def _ring(dx, dy, r, x, y, period, phase):
    d2 = dx**2 + dy**2
    return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)


def _hstripes(dx, dy, r, x, y, period, phase):
    return np.sin(2 * np.pi * y / period + phase) > 0


def _vstripes(dx, dy, r, x, y, period, phase):
    return np.sin(2 * np.pi * x / period + phase) > 0


def _checker(dx, dy, r, x, y, period, phase):
    half = period / 2
    return ((np.floor((x + phase) / half) + np.floor((y + phase) / half)) % 2) == 0


def _diagonal(dx, dy, r, x, y, period, phase):
    return np.sin(2 * np.pi * (x + y) / (period * np.sqrt(2)) + phase) > 0


def _cross(dx, dy, r, x, y, period, phase):
    w = 0.45 * r
    return ((np.abs(dx - dy) <= w) | (np.abs(dx + dy) <= w)) & (np.maximum(np.abs(dx), np.abs(dy)) <= 0.8 * r)


PATTERNS: tuple[tuple[str, Mask], ...] = (
    ("disk", _disk),
    ("square", _square),
    ("triangle", _triangle),
    ("plus", _plus),
    ("ring", _ring),
    ("hstripes", _hstripes),
    ("vstripes", _vstripes),
    ("checker", _checker),
    ("diagonal", _diagonal),
    ("cross", _cross),
)


def _colours(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3) foreground and background colours at least MIN_LUMA_GAP apart in brightness."""
    luma = np.array([0.299, 0.587, 0.114])
    fg = rng.uniform(0, 1, (n, 3))
    bg = rng.uniform(0, 1, (n, 3))
    for _ in range(100):
        bad = np.abs((fg - bg) @ luma) < MIN_LUMA_GAP
        if not bad.any():
            break
        fg[bad] = rng.uniform(0, 1, (int(bad.sum()), 3))
        bg[bad] = rng.uniform(0, 1, (int(bad.sum()), 3))
    return fg, bg


def render(pattern: Mask, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, RENDER_SIZE, RENDER_SIZE, 3) uint8 images of one pattern."""
    s = RENDER_SIZE
    col = lambda a: a[:, None, None]  # noqa: E731 - (n,) -> (n, 1, 1) for broadcasting
    r = col(rng.uniform(0.25, 0.42, n) * s)
    cx = col(rng.uniform(0.5 - 0.12, 0.5 + 0.12, n) * s)
    cy = col(rng.uniform(0.5 - 0.12, 0.5 + 0.12, n) * s)
    period = col(rng.uniform(5.0, 9.0, n))
    phase = col(rng.uniform(0, 2 * np.pi, n))
    y, x = np.mgrid[0:s, 0:s].astype(np.float64) + 0.5
    x, y = x[None], y[None]
    mask = pattern(x - cx, y - cy, r, x, y, period, phase)
    mask = np.broadcast_to(mask, (n, s, s))[..., None]
    fg, bg = _colours(rng, n)
    img = np.where(mask, fg[:, None, None, :], bg[:, None, None, :])
    img = img + rng.normal(0, NOISE_STD, img.shape)
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def generate(p: SyntheticParams, seed: int) -> RawDataset:
    """``p.classes`` patterns, ``p.train_per_class`` and ``p.test_per_class`` PNGs of each, streamed
    one class of one split at a time."""
    per_split = {"train": p.train_per_class, "test": p.test_per_class}

    def images() -> Iterator[tuple[str, RawImage]]:
        for split_index, split in enumerate(SPLITS):
            for class_index, (name, pattern) in enumerate(PATTERNS[: p.classes]):
                rng = np.random.default_rng([seed, split_index, class_index])
                pixels = render(pattern, per_split[split], rng)
                for i in range(len(pixels)):
                    path = f"{split}/{name}/{i:05d}.png"
                    yield split, RawImage(path=path, class_name=name, image=encode_png(pixels[i]))

    return RawDataset(
        source="synthetic",
        images=images,
        total=p.classes * (p.train_per_class + p.test_per_class),
        details={"generator": "tasks.data.sources.synthetic", "seed": seed, "render_size": RENDER_SIZE},
    )
