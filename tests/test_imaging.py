"""tasks/data/imaging.py: one encoded image -> (C, H, W) uint8, the same for training and serving."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tasks.data.imaging import encode_png, to_array
from tasks.errors import DataError

from conftest import sideways_photo


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16"])
@pytest.mark.parametrize("channels", [1, 3])
def test_any_mode_converts_to_the_requested_shape(mode: str, channels: int) -> None:
    img = Image.new("RGB", (20, 10), (200, 40, 10)).convert(mode)
    out = to_array(_encode(img), image_size=8, channels=channels)
    assert out.shape == (channels, 8, 8)
    assert out.dtype == np.uint8


def test_rgb_pixels_are_channel_first_and_unchanged_at_native_size() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    out = to_array(encode_png(pixels), image_size=6, channels=3)
    np.testing.assert_array_equal(out, pixels.transpose(2, 0, 1))


def test_transparent_background_becomes_white_not_black() -> None:
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    out = to_array(_encode(img), image_size=4, channels=3)
    assert (out == 255).all()


def test_jpeg_is_decoded() -> None:
    img = Image.new("RGB", (16, 16), (10, 200, 30))
    out = to_array(_encode(img, "JPEG"), image_size=16, channels=3)
    assert abs(int(out[1].mean()) - 200) < 5


def test_truncated_png_is_a_data_error() -> None:
    data = encode_png(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="undecodable"):
        to_array(data[: len(data) // 2], 32, 3)


def test_text_file_is_a_data_error() -> None:
    with pytest.raises(DataError, match="undecodable"):
        to_array(b"this is not an image\n", 32, 3)


def test_encode_png_is_byte_reproducible() -> None:
    pixels = np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert encode_png(pixels) == encode_png(pixels.copy())


def test_exif_orientation_is_applied() -> None:
    encoded, upright = sideways_photo()
    out = to_array(encoded, image_size=16, channels=3)
    viewed = np.asarray(Image.fromarray(upright).resize((16, 16), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    assert np.abs(out.astype(int) - viewed.astype(int)).max() < 40  # JPEG noise, not a quarter turn
    assert out[0, :, 12:].mean() > 200 and out[0, :, :4].mean() < 50  # red on the right, as a viewer shows it


@pytest.mark.parametrize("pixels", [150, 250])  # above the limit (Pillow warns), and twice it (Pillow refuses)
def test_a_decompression_bomb_is_an_undecodable_image(monkeypatch: pytest.MonkeyPatch, pixels: int) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    data = encode_png(np.zeros((pixels // 10, 10, 3), np.uint8))
    with pytest.raises(DataError, match=r"undecodable image .*decompression bomb"):
        to_array(data, 8, 3)
