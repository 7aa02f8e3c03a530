"""Decoding and conversion of ONE encoded image into the pixels the model sees.

prepare (training data) and predict (serving) both decode with :func:`decode` and convert with
:func:`convert` (:func:`to_array` is both), so train and serve see exactly the same pixels for the
same file, EXIF orientation included.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from tasks.errors import DataError

# A truncated file must be reported as corrupt, not silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Suffixes a class-folder source accepts as images (lower case); anything else is refused by name.
IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)

_MODE_FOR_CHANNELS = {1: "L", 3: "RGB"}
EXIF_ORIENTATION = 0x0112  # the EXIF tag; 1 means stored upright


def decode(encoded: bytes) -> Image.Image:
    """The fully loaded image, turned upright as its EXIF orientation says (a phone photo taken
    sideways is stored sideways); :class:`DataError` when the bytes are not a readable image."""
    try:
        with warnings.catch_warnings():
            # Pillow warns (rather than raises) on moderately large images; treat it as an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(encoded))
            img.load()
        # Only an image with an EXIF block (JPEG, PNG, WebP) or TIFF tags can say it is stored sideways.
        if ("exif" in img.info or img.format == "TIFF") and img.getexif().get(EXIF_ORIENTATION, 1) != 1:
            img = ImageOps.exif_transpose(img) or img
    except UnidentifiedImageError as exc:
        # Pillow's own message quotes a memory address; keep the manifest reproducible.
        raise DataError(f"undecodable image ({len(encoded)} bytes): not a recognised image format") from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"undecodable image ({len(encoded)} bytes): {exc}") from exc
    return img


def convert(img: Image.Image, image_size: int, channels: int) -> np.ndarray:
    """(C, H, W) uint8 with H = W = image_size; any mode (L, RGB, RGBA, P, I;16) in."""
    if channels not in _MODE_FOR_CHANNELS:
        raise DataError(f"channels must be 1 or 3, got {channels}")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white, so a transparent background is not read as black.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    elif img.mode.startswith("I;16") or img.mode in ("I", "F"):
        # 16-bit/float greyscale: rescale to 8 bits instead of clipping.
        wide = np.asarray(img, dtype=np.float64)
        lo, hi = float(wide.min()), float(wide.max())
        scaled = (wide - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(wide)
        img = Image.fromarray(scaled.round().astype(np.uint8))
    if img.mode != _MODE_FOR_CHANNELS[channels]:
        img = img.convert(_MODE_FOR_CHANNELS[channels])
    if img.size != (image_size, image_size):
        # Stretch to a square: classification keeps the whole frame rather than a centre crop.
        img = img.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    pixels = np.asarray(img, dtype=np.uint8)
    if channels == 1:
        return pixels[np.newaxis, :, :].copy()
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def to_array(encoded: bytes, image_size: int, channels: int) -> np.ndarray:
    """Decode ``encoded`` (PNG/JPEG/...) into (C, H, W) uint8; :class:`DataError` if undecodable."""
    return convert(decode(encoded), image_size, channels)


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of an (H, W) or (H, W, 3) uint8 array; the same array always gives the same bytes."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
