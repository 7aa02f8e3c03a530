"""tasks/data/phash.py: 64-bit DCT hashes that survive re-encoding, resizing and brightening."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tasks.data import phash
from tasks.data.imaging import encode_png, to_array
from tasks.data.sources import synthetic
from tasks.params import SyntheticParams


def _bits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(a ^ b)


@pytest.fixture(scope="module")
def shapes() -> list[bytes]:
    dataset = synthetic.generate(SyntheticParams(10, 1, 10), seed=0)
    return [img.image for split, img in dataset.images() if split == "test"]


def _jpeg(png: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).save(buf, format="JPEG", quality=75)
    return buf.getvalue()


def _resized(png: bytes, by: int) -> bytes:
    img = Image.open(io.BytesIO(png))
    buf = io.BytesIO()
    img.resize((img.width + by, img.height + by), Image.Resampling.BILINEAR).save(buf, format="PNG")
    return buf.getvalue()


def _brightened(png: bytes, factor: float) -> bytes:
    pixels = np.asarray(Image.open(io.BytesIO(png)), dtype=np.float32)
    return encode_png(np.clip(pixels * factor, 0, 255).round().astype(np.uint8))


@pytest.mark.parametrize("transform", [_jpeg, lambda b: _resized(b, -3), lambda b: _resized(b, 3),
                                       lambda b: _brightened(b, 1.1)], ids=["jpeg", "smaller", "larger", "brighter"])
def test_copies_stay_within_a_few_bits_while_other_images_differ_in_about_half(shapes, transform) -> None:
    originals = phash.dct_hashes(np.stack([to_array(b, 32, 3) for b in shapes]))
    copies = phash.dct_hashes(np.stack([to_array(transform(b), 32, 3) for b in shapes]))
    moved = _bits(originals, copies)
    assert np.median(moved) <= 2 and np.mean(moved <= 8) >= 0.95  # 8: validate.near_duplicate_bits
    others = _bits(originals[:, None], originals[None, :])[~np.eye(len(originals), dtype=bool)]
    assert np.median(others) >= 20


def test_a_grey_image_hashes_the_same_in_one_or_three_channels() -> None:
    grey = np.random.default_rng(0).integers(0, 256, (5, 1, 24, 24), dtype=np.uint8)
    np.testing.assert_array_equal(phash.dct_hashes(grey), phash.dct_hashes(np.repeat(grey, 3, axis=1)))


def test_blocks_and_batches_do_not_change_a_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    images = np.random.default_rng(1).integers(0, 256, (9, 3, 16, 16), dtype=np.uint8)
    whole = phash.dct_hashes(images)
    monkeypatch.setattr(phash, "SLICE", 4)
    np.testing.assert_array_equal(phash.dct_hashes(images), whole)
    np.testing.assert_array_equal(np.concatenate([phash.dct_hashes(images[i : i + 1]) for i in range(9)]), whole)
    assert len(set(whole.tolist())) == 9


def test_hex_round_trip_is_exact_for_the_high_bit() -> None:
    hashes = np.array([0, 1, 2**63, 2**64 - 1, 0x0123456789ABCDEF], dtype=np.uint64)
    text = phash.to_hex(hashes)
    assert text[2] == "8000000000000000" and all(len(t) == 16 for t in text)
    np.testing.assert_array_equal(phash.from_hex(text), hashes)
    assert phash.from_hex([]).shape == (0,)


def test_non_square_or_wrong_channel_arrays_are_refused() -> None:
    with pytest.raises(ValueError, match="square"):
        phash.dct_hashes(np.zeros((1, 3, 8, 9), np.uint8))
    with pytest.raises(ValueError, match="C 1 or 3"):
        phash.dct_hashes(np.zeros((1, 4, 8, 8), np.uint8))
