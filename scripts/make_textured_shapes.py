"""Write textured_shapes: a 4-style image-folder benchmark (DomainBed layout) whose styles are textures.

The benchmark for choosing defaults that transfer beyond digits (issue 17, "defaults that transfer"): the
same ten shape classes in four rendering styles with very different image statistics, written as PNG files
in ``root/<style>/<class>/<index>.png`` and read like any user's folder (``data=folder`` or
``+exp=textured_erm``). Styles (the texture of the shape and of the background):

- ``flat``: flat colours (near-uniform, the easy style);
- ``stripes``: sinusoidal stripes of random period and angle in two colours;
- ``noise``: smooth random noise (a coarse grid upsampled) in two colours;
- ``photo``: crops of scikit-image photographs (offline, shipped with scikit-image).

Shape and background always get independent textures of the style, so the class is in the outline only. Each
image is drawn at 128 px and downsampled to 32 px (anti-aliased). Every (style, class) draws from
``np.random.default_rng([seed, style_index, class_index])``: the tree is the same on every machine. The
textures are ``dgkit.data.embedded.sam_corpus``'s (one texture generator in the project).

    python scripts/make_textured_shapes.py --out datasets/textured_shapes      # 4 x 10 x 100 images, ~20 s
    python scripts/make_textured_shapes.py --out datasets/textured_shapes --grid docs/img/textured_shapes_samples.png
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dgkit.data.embedded.sam_corpus import FAMILIES, SIZE, fill_texture

STYLES = ("flat", "stripes", "noise", "photo")
CLASSES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon", "arrow", "crescent")
_PHOTOS = tuple(name for names in FAMILIES.values() for name in names)


def outline(rng: np.random.Generator, kind: str) -> np.ndarray:
    """The class's shape as ``bool (128, 128)``: random size, position and a small rotation (at most 15°)."""
    m = Image.new("L", (SIZE, SIZE), 0)
    d = ImageDraw.Draw(m)
    r = rng.uniform(28, 52)
    cx, cy = rng.uniform(r + 4, SIZE - r - 4, 2)
    a = math.radians(rng.uniform(-15, 15))

    def poly(radius: np.ndarray, theta: np.ndarray, fill: int = 255) -> None:
        x, y = radius * np.cos(theta + a), radius * np.sin(theta + a)
        d.polygon([(float(cx + u), float(cy + v)) for u, v in zip(x, y)], fill=fill)

    def placed(points, fill: int = 255) -> None:  # (x, y) about the centre: rotated by a, moved to (cx, cy)
        c, s = math.cos(a), math.sin(a)
        d.polygon([(float(cx + u * c - v * s), float(cy + u * s + v * c)) for u, v in points], fill=fill)

    def regular(n: int, phase: float, scale: float = 1.0, fill: int = 255) -> None:
        t = np.arange(n) * 2 * math.pi / n + phase
        poly(np.full(n, r * scale), t, fill)

    if kind == "circle":
        regular(64, 0.0)
    elif kind == "square":
        regular(4, math.pi / 4)
    elif kind == "diamond":
        regular(4, 0.0)
    elif kind == "triangle":
        regular(3, -math.pi / 2)
    elif kind == "hexagon":
        regular(6, 0.0)
    elif kind == "star":
        t = np.arange(10) * math.pi / 5 - math.pi / 2
        poly(np.where(np.arange(10) % 2 == 0, r, 0.42 * r), t)
    elif kind == "ring":
        regular(64, 0.0)
        regular(64, 0.0, 0.55, fill=0)
    elif kind == "crescent":
        regular(64, 0.0)
        shift = 0.45 * r
        t = np.arange(64) * 2 * math.pi / 64
        placed(zip(0.9 * r * np.cos(t) + shift, 0.9 * r * np.sin(t)), fill=0)
    elif kind in ("cross", "arrow"):
        w = 0.3 * r
        if kind == "cross":
            pts = [
                (-w, -r),
                (w, -r),
                (w, -w),
                (r, -w),
                (r, w),
                (w, w),
                (w, r),
                (-w, r),
                (-w, w),
                (-r, w),
                (-r, -w),
                (-w, -w),
            ]
        else:  # pointing right: a shaft and a triangular head
            pts = [(-r, -w), (0.1 * r, -w), (0.1 * r, -0.8 * r), (r, 0), (0.1 * r, 0.8 * r), (0.1 * r, w), (-r, w)]
        placed(pts)
    else:
        raise ValueError(f"shape {kind!r}; valid: {list(CLASSES)}")
    return np.asarray(m) > 127


def render(rng: np.random.Generator, style: str, kind: str, size: int = 32) -> np.ndarray:
    """One image ``uint8 (size, size, 3)``: the class's outline in one texture of the style over another."""
    if style not in STYLES:
        raise ValueError(f"style {style!r}; valid: {list(STYLES)}")
    mask = outline(rng, kind)[..., None]
    fg, bg = fill_texture(rng, style, _PHOTOS), fill_texture(rng, style, _PHOTOS)
    img = np.where(mask, fg, bg).clip(0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(img).resize((size, size), Image.LANCZOS))


def write(out: Path, per_class: int = 100, seed: int = 0, size: int = 32) -> int:
    """Write the tree under ``out`` (files are replaced); return the number of images written."""
    n = 0
    for si, style in enumerate(STYLES):
        for ci, kind in enumerate(CLASSES):
            rng = np.random.default_rng([seed, si, ci])
            folder = out / style / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(render(rng, style, kind, size)).save(folder / f"{i:04d}.png")
                n += 1
    return n


def sample_grid(out: Path, path: Path, per_style: int = 2, zoom: int = 3) -> None:
    """A PNG of the written tree: ``per_style`` rows per style, one column per class (in ``CLASSES`` order)."""
    rows = [
        np.concatenate([np.asarray(Image.open(out / style / kind / f"{i:04d}.png")) for kind in CLASSES], axis=1)
        for style in STYLES
        for i in range(per_style)
    ]
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.resize((grid.width * zoom, grid.height * zoom), Image.NEAREST).save(path)


def main() -> None:
    """Command line: ``--out``, ``--per-class``, ``--seed``, ``--size``, ``--grid``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("datasets/textured_shapes"))
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--grid", type=Path, default=None, help="also write a sample grid PNG here")
    a = p.parse_args()
    n = write(a.out, a.per_class, a.seed, a.size)
    print(f"wrote {n} images ({len(STYLES)} styles x {len(CLASSES)} classes) to {a.out}")
    if a.grid:
        sample_grid(a.out, a.grid)
        print(f"sample grid: {a.grid}")


if __name__ == "__main__":
    main()
