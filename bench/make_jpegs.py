"""Write natural-looking test JPEGs as an image folder, for bench/input_pipeline.py.

    python bench/make_jpegs.py --out=/tmp/jpegs --count=400 [--classes=4] [--width=500 --height=375]

Decode speed depends on how an image compresses: noise makes large files with
little structure, flat colour tiny ones. These mix smooth gradients, shapes with
edges and mild sensor-like noise, saved at quality 90, which gives file sizes
(about 60-120 KB at 500x375) close to ImageNet photos. Files go to
OUT/train/class_K/ and a tenth of them to OUT/validation/class_K/.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def natural_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Gradients + blurred shapes + fine noise: an RGB image that compresses like a photo."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.zeros((height, width, 3), np.float32)
    for channel in range(3):
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.cos(angle) * x / width + np.sin(angle) * y / height
        base[..., channel] = 128 + 90 * np.sin(2 * np.pi * rng.uniform(0.3, 1.5) * ramp + rng.uniform(0, 6))
    picture = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for _ in range(rng.integers(6, 16)):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        x1, y1 = x0 + rng.integers(20, width // 2), y0 + rng.integers(20, height // 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        else:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
    picture = picture.filter(ImageFilter.GaussianBlur(rng.uniform(0.6, 2.0)))
    pixels = np.asarray(picture, np.float32)
    texture = rng.normal(0, rng.uniform(4, 10), size=(height, width, 1)) + rng.normal(0, 3, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels + texture, 0, 255).astype(np.uint8))


def write_folder(out: str, count: int, *, classes: int = 4, width: int = 500, height: int = 375, seed: int = 0):
    rng = np.random.default_rng(seed)
    total_bytes = 0
    for index in range(count):
        split = "validation" if index % 10 == 9 else "train"
        class_dir = os.path.join(out, split, f"class_{index % classes}")
        os.makedirs(class_dir, exist_ok=True)
        path = os.path.join(class_dir, f"img_{index:05d}.JPEG")
        natural_image(rng, width, height).save(path, quality=90)
        total_bytes += os.path.getsize(path)
    return total_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    total = write_folder(
        args.out, args.count, classes=args.classes, width=args.width, height=args.height, seed=args.seed
    )
    print(
        f"wrote {args.count} JPEGs of {args.width}x{args.height} to {args.out}, mean {total / args.count / 1024:.0f} KB"
    )


if __name__ == "__main__":
    main()
