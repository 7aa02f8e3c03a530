"""Write a small grayscale digit dataset as class folders, standing in for the 8x8 handwritten-digit
set (about 1,800 images in 10 folders) that the training defaults must handle on a CPU.

Each image is a digit glyph drawn with random rotation, shear, scale, offset and stroke width,
box-downsampled to 8x8 and quantised to 17 grey levels, white ink on black, like that set.

    python benchmarks/digits_like.py OUT_DIR [--per-class 180] [--seed 0]
    visionops run -S data.source=OUT_DIR -S train.epochs=10
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

CANVAS = 32  # px drawing canvas, downsampled to SIZE
SIZE = 8  # px, as the original set
LEVELS = 16  # grey levels 0..16, as the original set


def draw_digit(
    digit: int, rng: np.random.Generator, font: ImageFont.FreeTypeFont | ImageFont.ImageFont
) -> Image.Image:
    canvas = Image.new("L", (CANVAS, CANVAS), 0)
    glyph = Image.new("L", (CANVAS, CANVAS), 0)
    ImageDraw.Draw(glyph).text((CANVAS / 2, CANVAS / 2), str(digit), fill=255, font=font, anchor="mm")
    width = int(rng.choice([1, 3, 3]))
    if width > 1:
        glyph = glyph.filter(ImageFilter.MaxFilter(width))
    scale = rng.uniform(0.8, 1.15)
    angle = math.radians(rng.uniform(-15, 15))
    shear = rng.uniform(-0.3, 0.3)
    dx, dy = rng.uniform(-2.5, 2.5, size=2)
    # Inverse affine map (output -> input) about the canvas centre: rotation, shear, scale, shift.
    c, s = math.cos(angle), math.sin(angle)
    a, b, d, e = c / scale, (s + shear) / scale, -s / scale, c / scale
    cx = cy = CANVAS / 2
    matrix = (a, b, cx - a * (cx + dx) - b * (cy + dy), d, e, cy - d * (cx + dx) - e * (cy + dy))
    canvas.paste(glyph.transform(glyph.size, Image.Transform.AFFINE, matrix, Image.Resampling.BILINEAR))
    small = np.asarray(canvas.resize((SIZE, SIZE), Image.Resampling.BOX), dtype=np.float64) / 255.0
    small = np.clip(small * rng.uniform(1.0, 1.6) + rng.normal(0, 0.04, small.shape), 0, 1)
    return Image.fromarray((np.round(small * LEVELS) * (255 // LEVELS)).astype(np.uint8), mode="L")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=180)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    font = ImageFont.load_default(size=24)
    for digit in range(10):
        folder = args.out / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(args.per_class):
            draw_digit(digit, rng, font).save(folder / f"{digit}_{i:04d}.png")
    print(f"wrote {10 * args.per_class} images of {SIZE}x{SIZE} in 10 class folders under {args.out}")


if __name__ == "__main__":
    main()
