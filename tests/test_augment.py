from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.params import AugmentParams, ConfigError
from tasks.training.augment import DeviceSplit, augment, channel_stats


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
    out = augment(images, AugmentParams(crop_padding=3, flip=True, cutout=0), torch.Generator().manual_seed(1))
    assert out.dtype == torch.uint8 and out.shape == images.shape
    for original, augmented in zip(images.numpy(), out.numpy(), strict=True):
        assert any(np.array_equal(augmented, w) for w in _windows(original, 3))
    assert not torch.equal(out, images)


def test_flip_mirrors_about_half_of_the_batch() -> None:
    images = _images(n=64)
    out = augment(images, AugmentParams(crop_padding=0, flip=True, cutout=0), torch.Generator().manual_seed(1))
    mirrored = (out == images.flip(3)).flatten(1).all(dim=1)
    unchanged = (out == images).flatten(1).all(dim=1)
    assert (mirrored | unchanged).all()
    assert 16 <= int(mirrored.sum()) <= 48


def test_no_augmentation_is_the_identity() -> None:
    images = _images()
    out = augment(images, AugmentParams(crop_padding=0, flip=False, cutout=0), torch.Generator().manual_seed(0))
    assert torch.equal(out, images)


def test_cutout_erases_one_square_of_at_most_side_squared_pixels_and_nothing_else() -> None:
    images = torch.full((16, 3, 10, 10), 200, dtype=torch.uint8)
    out = augment(images, AugmentParams(crop_padding=0, flip=False, cutout=4), torch.Generator().manual_seed(3))
    erased = out[:, 0] == 0
    assert torch.equal(erased.unsqueeze(1).expand_as(out), out == 0)  # same square in every channel
    assert (out[out != 0] == 200).all()
    counts = erased.sum(dim=(1, 2))
    assert counts.max() == 16 and (counts >= 4).all()  # wholly inside -> 16 px; at a corner at least 2x2
    rows, cols = erased.any(dim=2), erased.any(dim=1)
    assert (erased.sum(dim=(1, 2)) == rows.sum(dim=1) * cols.sum(dim=1)).all()  # a rectangle, not scattered pixels


def test_same_generator_seed_gives_the_same_batch() -> None:
    images = _images(n=16)
    a = AugmentParams(crop_padding=2, flip=True, cutout=3)
    first = augment(images, a, torch.Generator().manual_seed(7))
    assert torch.equal(first, augment(images, a, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, augment(images, a, torch.Generator().manual_seed(8)))


def test_padding_as_large_as_the_image_is_refused() -> None:
    with pytest.raises(ConfigError, match="crop_padding"):
        augment(_images(size=4), AugmentParams(crop_padding=4, flip=False, cutout=0), torch.Generator())


def test_channel_stats_match_numpy_on_the_unit_scale() -> None:
    images = _images(n=10, c=3)
    mean, std = channel_stats(images)
    scaled = images.numpy().astype(np.float64) / 255
    np.testing.assert_allclose(mean, scaled.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(std, scaled.std(axis=(0, 2, 3)), rtol=1e-9)


def test_constant_channel_gets_a_floor_on_std_not_a_division_by_zero() -> None:
    _, std = channel_stats(torch.zeros(3, 1, 4, 4, dtype=torch.uint8))
    assert std[0] > 0


def test_train_batches_cover_each_image_at_most_once_and_drop_the_partial_batch() -> None:
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1).repeat(4, axis=2).repeat(4, axis=3)
    split = DeviceSplit.from_arrays(images, np.arange(10), [0.0], [1 / 255], torch.device("cpu"))
    batches = list(split.train_batches(4, AugmentParams(0, False, 0), torch.Generator().manual_seed(0)))
    assert len(batches) == 2
    seen = torch.cat([labels for _, labels in batches])
    assert len(set(seen.tolist())) == 8
    for x, labels in batches:
        # normalised with mean 0 and std 1/255 gives back the raw value, which equals the label here
        torch.testing.assert_close(x[:, 0, 0, 0], labels.float())
        assert x.is_contiguous(memory_format=torch.channels_last)


def test_eval_batches_return_every_image_in_order_unaugmented() -> None:
    images = _images(n=5, c=1)
    split = DeviceSplit.from_arrays(images.numpy(), np.arange(5), [0.5], [0.25], torch.device("cpu"))
    x = torch.cat([b for b, _ in split.eval_batches(2)])
    torch.testing.assert_close(x, (images.float() / 255 - 0.5) / 0.25)
