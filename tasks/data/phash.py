"""Perceptual hashes of prepared images: 64-bit DCT hashes that survive re-encoding, resizing and brightening.

The hash of an image is the sign pattern of the 8x8 lowest 2-D DCT frequencies of its luma, resampled
to 32x32, against their median (the pHash recipe). Re-encoding, resizing by a few pixels and a
change of brightness move those coefficients little, so the hash changes by a few bits; different
content changes about half of them. Everything is matrix products over a whole batch of
(N, C, H, W) uint8 images: no per-image Python.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

HASH_SIDE = 8  # DCT frequencies kept per axis: 8 x 8 = 64 bits
RESAMPLE_SIDE = 32  # px the luma is resampled to before the DCT (pHash's 4x oversampling)
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as Pillow's "L"
BIT_WEIGHTS = np.uint64(1) << np.arange(64, dtype=np.uint64)[::-1]  # row-major bit 0 is the high bit
SLICE = 4096  # images per block: bounds the float32 temporaries


def _area_resampling(side: int) -> np.ndarray:
    """(RESAMPLE_SIDE, side) weights averaging the input pixels each output pixel covers."""
    edges = np.linspace(0.0, side, RESAMPLE_SIDE + 1)
    lo, hi = edges[:-1, None], edges[1:, None]
    pixel = np.arange(side)[None, :]
    overlap = np.clip(np.minimum(hi, pixel + 1) - np.maximum(lo, pixel), 0.0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def _dct_rows(n: int, keep: int) -> np.ndarray:
    """The first ``keep`` rows of the orthonormal DCT-II matrix of size ``n``."""
    k = np.arange(keep)[:, None]
    x = np.arange(n)[None, :]
    basis = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    basis[0] /= np.sqrt(2.0)
    return basis


@lru_cache(maxsize=8)
def _projection(side: int) -> np.ndarray:
    """(HASH_SIDE, side): resampling to 32 px and the low DCT rows, folded into one matrix."""
    matrix = _dct_rows(RESAMPLE_SIDE, HASH_SIDE) @ _area_resampling(side)
    return matrix.astype(np.float32)


def dct_hashes(images: np.ndarray) -> np.ndarray:
    """uint64 (N,) perceptual hashes of uint8 images (N, C, H, W), C 1 or 3, H = W."""
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[2] != images.shape[3]:
        raise ValueError(f"expected square uint8 images (N, C, S, S) with C 1 or 3, got {images.shape}")
    projection = _projection(images.shape[2])
    out = np.empty(len(images), dtype=np.uint64)
    for start in range(0, len(images), SLICE):
        block = images[start : start + SLICE].astype(np.float32)
        luma = block[:, 0] if block.shape[1] == 1 else np.einsum("nchw,c->nhw", block, LUMA)
        low = (projection @ luma @ projection.T).reshape(len(block), -1)  # (n, 64)
        bits = low > np.median(low, axis=1, keepdims=True)
        out[start : start + len(block)] = (bits.astype(np.uint64) * BIT_WEIGHTS).sum(axis=1, dtype=np.uint64)
    return out


def to_hex(hashes: np.ndarray) -> list[str]:
    """16 hex digits per hash: the manifest column (Parquet has no nullable uint64 pandas keeps exact)."""
    return [f"{int(h):016x}" for h in hashes]


def from_hex(column: list[str] | np.ndarray) -> np.ndarray:
    """uint64 (N,) from 16-hex-digit strings, in one conversion."""
    if len(column) == 0:
        return np.empty(0, dtype=np.uint64)
    return np.frombuffer(bytes.fromhex("".join(column)), dtype=">u8").astype(np.uint64)
