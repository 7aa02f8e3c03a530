from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tasks import params
from tasks.params import AugmentParams, ConfigError
from tasks.training.augment import augment, channel_stats, random_resized_crop

PROJECT = Path(__file__).resolve().parents[1]


def aug(**changes: Any) -> AugmentParams:
    """params.yaml's train.augment with ``changes``."""
    return dataclasses.replace(params.load(PROJECT / "params.yaml").train.augment, **changes)


def _images(n: int = 6, c: int = 2, size: int = 8) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def _windows(image: np.ndarray, pad: int) -> list[np.ndarray]:
    """Every crop of the reflect-padded image and its mirror: what RandomCrop(padding_mode=reflect)+flip can give."""
    size = image.shape[-1]
    padded = np.pad(image, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
    crops = [padded[:, y : y + size, x : x + size] for y in range(2 * pad + 1) for x in range(2 * pad + 1)]
    return crops + [crop[:, :, ::-1] for crop in crops]


def test_crop_and_flip_give_windows_of_the_reflect_padded_image() -> None:
    images = _images(n=32)
    out = augment(images, aug(crop_padding=3, flip=True, cutout=0), torch.Generator().manual_seed(1))
    assert out.dtype == torch.uint8 and out.shape == images.shape
    for original, augmented in zip(images.numpy(), out.numpy(), strict=True):
        assert any(np.array_equal(augmented, w) for w in _windows(original, 3))
    assert not torch.equal(out, images)


def test_flip_mirrors_about_half_of_the_batch() -> None:
    images = _images(n=64)
    out = augment(images, aug(crop_padding=0, flip=True, cutout=0), torch.Generator().manual_seed(1))
    mirrored = (out == images.flip(3)).flatten(1).all(dim=1)
    unchanged = (out == images).flatten(1).all(dim=1)
    assert (mirrored | unchanged).all()
    assert 16 <= int(mirrored.sum()) <= 48


def test_no_augmentation_is_the_identity() -> None:
    images = _images()
    out = augment(images, aug(crop_padding=0, flip=False, cutout=0), torch.Generator().manual_seed(0))
    assert torch.equal(out, images)


def test_cutout_erases_one_square_of_at_most_side_squared_pixels_and_nothing_else() -> None:
    images = torch.full((16, 3, 10, 10), 200, dtype=torch.uint8)
    out = augment(images, aug(crop_padding=0, flip=False, cutout=4), torch.Generator().manual_seed(3))
    erased = out[:, 0] == 0
    assert torch.equal(erased.unsqueeze(1).expand_as(out), out == 0)  # same square in every channel
    assert (out[out != 0] == 200).all()
    counts = erased.sum(dim=(1, 2))
    assert counts.max() == 16 and (counts >= 4).all()  # wholly inside -> 16 px; at a corner at least 2x2
    rows, cols = erased.any(dim=2), erased.any(dim=1)
    assert (erased.sum(dim=(1, 2)) == rows.sum(dim=1) * cols.sum(dim=1)).all()  # a rectangle, not scattered pixels


def test_same_generator_seed_gives_the_same_batch() -> None:
    images = _images(n=16)
    a = aug(crop_padding=2, flip=True, cutout=3)
    first = augment(images, a, torch.Generator().manual_seed(7))
    assert torch.equal(first, augment(images, a, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, augment(images, a, torch.Generator().manual_seed(8)))


def test_padding_as_large_as_the_image_is_refused() -> None:
    with pytest.raises(ConfigError, match="crop_padding"):
        augment(_images(size=4), aug(crop_padding=4, flip=False, cutout=0), torch.Generator())


def test_channel_stats_match_numpy_on_the_unit_scale() -> None:
    images = _images(n=10, c=3)
    mean, std = channel_stats(images.numpy())
    scaled = images.numpy().astype(np.float64) / 255
    np.testing.assert_allclose(mean, scaled.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(std, scaled.std(axis=(0, 2, 3)), rtol=1e-9)


def test_constant_channel_gets_a_floor_on_std_not_a_division_by_zero() -> None:
    _, std = channel_stats(np.zeros((3, 1, 4, 4), dtype=np.uint8))
    assert std[0] > 0


def test_channel_stats_are_the_same_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.training.augment as augment_module

    images = _images(n=9, c=3, size=8).numpy()
    whole = channel_stats(images)
    monkeypatch.setattr(augment_module, "_STATS_CHUNK_BYTES", 2 * 3 * 8 * 8)  # 2 images a chunk, 5 chunks
    chunked = channel_stats(images)
    np.testing.assert_allclose(chunked, whole, rtol=1e-12)


def _box_image(size: int = 16) -> torch.Tensor:
    """One image whose pixel (y, x) holds y * size + x in channel 0 and x in channel 1: positions are readable."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return torch.stack([ys * size + xs, xs]).to(torch.float32)[None]


def test_random_resized_crop_full_scale_without_flip_is_the_identity() -> None:
    image = _box_image().repeat(4, 1, 1, 1)
    a = aug(crop_padding=0, random_resized_crop=True, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False)
    out = random_resized_crop(image, a, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, image)


def test_random_resized_crop_zooms_into_a_window_of_the_requested_area() -> None:
    size = 16
    image = _box_image(size).repeat(64, 1, 1, 1)
    a = aug(crop_padding=0, random_resized_crop=True, crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0), flip=False)
    out = random_resized_crop(image, a, torch.Generator().manual_seed(1))
    assert out.shape == image.shape and out.dtype == torch.float32
    # A square crop of a quarter of the area is half the side: adjacent output columns step by 1/2 px.
    column_step = out[:, 1, :, 1:] - out[:, 1, :, :-1]
    torch.testing.assert_close(column_step[:, 2:-2, 2:-2], torch.full_like(column_step[:, 2:-2, 2:-2], 0.5))
    # ...and the window lies inside the image, at different places for different samples.
    assert out[:, 1].min() >= 0 and out[:, 1].max() <= size - 1
    assert len({round(float(v), 3) for v in out[:, 1, 0, 0]}) > 10


def test_random_resized_crop_flips_about_half_of_the_batch() -> None:
    image = _box_image().repeat(64, 1, 1, 1)
    a = aug(crop_padding=0, random_resized_crop=True, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=True)
    out = random_resized_crop(image, a, torch.Generator().manual_seed(2))
    mirrored = (out - image.flip(3)).abs().amax(dim=(1, 2, 3)) < 1e-3  # exact up to float rounding of the grid
    unchanged = (out - image).abs().amax(dim=(1, 2, 3)) < 1e-3
    assert (mirrored | unchanged).all() and 16 <= int(mirrored.sum()) <= 48


def test_augment_with_random_resized_crop_then_cutout_is_seeded() -> None:
    images = _images(n=8, c=3, size=12)
    a = aug(crop_padding=0, random_resized_crop=True, cutout=4)
    first = augment(images, a, torch.Generator().manual_seed(3))
    assert first.dtype == torch.float32 and first.shape == images.shape
    assert (first == 0).flatten(1).any(dim=1).all(), "every image has its cutout square"
    torch.testing.assert_close(first, augment(images, a, torch.Generator().manual_seed(3)), rtol=0, atol=0)
    assert not torch.equal(first, augment(images, a, torch.Generator().manual_seed(4)))


def test_random_resized_crop_with_crop_padding_is_refused_naming_both_keys() -> None:
    raw = params.read_raw(PROJECT / "params.yaml")
    changed = params.apply_overrides(raw, {"train.augment.random_resized_crop": True, "train.augment.crop_padding": 4})
    with pytest.raises(ConfigError, match=r"crop_padding must be 0 when train\.augment\.random_resized_crop"):
        params.parse(changed)
