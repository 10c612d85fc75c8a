"""digits_dg: ten digit classes in four visual styles, built offline from data that ships with packages.

A stand-in for the Digits-DG benchmark (MNIST, MNIST-M, SYN, SVHN), which needs a download. Each domain
imitates one of those styles from material available on any machine that installs dgkit:

- ``ink``: scikit-learn's real handwritten digits (1797, 8x8), upsampled with a small random affine,
  dark ink on slightly tinted paper (MNIST-like, inverted).
- ``photo``: MNIST-M style: another affine copy of the handwritten digits blended over crops of the real
  colour photos bundled with scikit-image and scikit-learn by difference, ``|background - 255 * mask|``.
- ``font``: SYN style: digits typeset with the TrueType fonts in Pillow and matplotlib (DejaVu, STIX,
  Computer Modern, Aileron), random size, stroke width, rotation and contrasting colours.
- ``street``: SVHN style: a three-digit house number cropped around its centre digit (the label), so
  parts of the neighbours show at the edges, then uneven lighting, Gaussian blur and sensor noise.

Hand-written rather than a torchvision dataset because nothing may be downloaded. Every domain draws
from its own ``np.random.default_rng([seed, domain_index])``, so a domain's images do not depend on the
others and the output is identical from run to run (same NumPy, Pillow and FreeType versions).
Images are 32x32 RGB ``uint8``; labels are the digit value.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from dgkit.data.embedded.cache import load_or_generate

DOMAINS = ("ink", "photo", "font", "street")
VERSION = "1"
SIZE = 32
NUM_CLASSES = 10

# Fonts in matplotlib's wheel (mpl-data/fonts/ttf) whose digits are ordinary glyphs; None is Pillow's default.
_FONTS = (
    None,
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "cmr10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
    "cmb10.ttf",
)
# House numbers are mostly upright sans or bold faces.
_STREET_FONTS = (
    None,
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSerif-Bold.ttf",
    "STIXGeneralBol.ttf",
    "cmss10.ttf",
    "cmb10.ttf",
)


def generate(n_per_domain: int = 1797, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """All four domains: ``{domain: (images uint8 (n, 32, 32, 3), labels int64 (n,))}``."""
    makers = {"ink": _ink, "photo": _photo, "font": _font, "street": _street}
    return {d: makers[d](n_per_domain, np.random.default_rng([seed, i])) for i, d in enumerate(DOMAINS)}


def load(root: str | Path, n_per_domain: int = 1797, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Load ``root/digits_dg``, generating it first if it is missing, stale or damaged."""
    params = {"n_per_domain": n_per_domain, "seed": seed}
    return load_or_generate("digits_dg", root, lambda: generate(n_per_domain, seed), VERSION, params)


# ----------------------------------------------------------------------------------------------- shared


@functools.cache
def _handwritten() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def _warp(
    src: np.ndarray, centre: tuple[float, float], k: float, rot: float, shift=(0.0, 0.0), bicubic: bool = False
) -> np.ndarray:
    """Resample ``src`` (2-D float) onto a ``SIZE`` square: ``centre`` of ``src`` lands at the middle of the
    output plus ``shift``, one output pixel spans ``k`` source pixels, rotated by ``rot`` degrees."""
    c, s = math.cos(math.radians(rot)), math.sin(math.radians(rot))
    ox, oy = SIZE / 2 + shift[0], SIZE / 2 + shift[1]
    a, b, d, e = k * c, k * s, -k * s, k * c
    data = (a, b, centre[0] - a * ox - b * oy, d, e, centre[1] - d * ox - e * oy)
    resample = Image.Resampling.BICUBIC if bicubic else Image.Resampling.BILINEAR
    img = Image.fromarray(src.astype(np.float32)).transform((SIZE, SIZE), Image.Transform.AFFINE, data, resample)
    return np.clip(np.asarray(img), 0.0, 1.0)


def _digit_masks(n: int, rng: np.random.Generator, rot: float, scale: tuple[float, float], shift: float):
    """``n`` handwritten digits (cycling through a shuffled copy of all 1797) as [0, 1] masks with labels."""
    images, labels = _handwritten()
    order = np.concatenate([rng.permutation(len(images)) for _ in range(-(-n // len(images)))])[:n]
    masks = np.empty((n, SIZE, SIZE), np.float32)
    for j, i in enumerate(order):
        k = 8.0 / (24.0 * rng.uniform(*scale))  # the 8x8 digit fills about 24 of the 32 pixels
        masks[j] = _warp(images[i], (4.0, 4.0), k, rng.uniform(-rot, rot), rng.uniform(-shift, shift, 2), True)
    masks = np.clip((masks - 0.1) / 0.6, 0.0, 1.0)  # firmer strokes than the blurry upsampling
    return masks, labels[order]


def _compose(mask: np.ndarray, background: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Paint ``colour`` through ``mask`` (H, W) over ``background`` (H, W, 3), all float."""
    return background * (1.0 - mask[..., None]) + colour * mask[..., None]


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _contrasting_colours(rng: np.random.Generator, min_diff: float) -> tuple[np.ndarray, np.ndarray]:
    """A foreground and background RGB pair whose luminances differ by at least ``min_diff``."""
    luma = np.array([0.299, 0.587, 0.114])
    while True:
        fg, bg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        if abs(float(fg @ luma - bg @ luma)) >= min_diff:
            return fg, bg


def _balanced_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % NUM_CLASSES).astype(np.int64)


@functools.cache
def _font_file(name: str | None, size: int) -> ImageFont.FreeTypeFont:
    if name is None:
        return ImageFont.load_default(size=size)
    import matplotlib

    return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", name), size)


def _render(text: str, font: ImageFont.FreeTypeFont, stroke: int, gap: float) -> tuple[np.ndarray, tuple]:
    """Typeset ``text`` one glyph at a time, ``gap`` pixels apart, white on black; return the [0, 1] canvas and
    the bounding box of the middle glyph."""
    size = font.size
    img = Image.new("L", (len(text) * size * 2 + 4 * size, 3 * size))
    draw = ImageDraw.Draw(img)
    x, boxes = 2.0 * size, []
    for ch in text:  # a space leaves a digit-wide hole
        box = draw.textbbox((x, 2 * size), ch if ch != " " else "0", font=font, anchor="ls", stroke_width=stroke)
        if ch != " ":
            draw.text((x, 2 * size), ch, fill=255, font=font, anchor="ls", stroke_width=stroke, stroke_fill=255)
        boxes.append(box)
        x = box[2] + gap
    return np.asarray(img, np.float32) / 255.0, boxes[len(text) // 2]


# ---------------------------------------------------------------------------------------------- domains


def _ink(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    masks, labels = _digit_masks(n, rng, rot=10.0, scale=(0.9, 1.1), shift=2.0)
    inks = np.array([[20, 20, 28], [25, 35, 95], [70, 45, 25]], np.float64)  # black, blue, sepia
    out = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for j in range(n):
        paper = 238 + rng.uniform(-10, 10) + rng.uniform(-6, 6, 3)  # light, slightly tinted
        grain = rng.normal(0, 3, (SIZE, SIZE, 1))
        ink = inks[rng.integers(len(inks))] + rng.uniform(-12, 12, 3)
        out[j] = _to_uint8(_compose(masks[j] * rng.uniform(0.85, 1.0), paper + grain, ink))
    return out, labels


@functools.cache
def _photos() -> tuple[np.ndarray, ...]:
    """Real colour photos bundled with scikit-image and scikit-learn, at full, half and quarter size."""
    import skimage.data as sd
    from sklearn.datasets import load_sample_images

    loaders = (sd.astronaut, sd.chelsea, sd.coffee, sd.rocket, sd.hubble_deep_field, sd.immunohistochemistry)
    photos = [np.asarray(f())[..., :3] for f in loaders] + [np.asarray(sd.stereo_motorcycle()[0])]
    photos += list(load_sample_images().images)
    out = []
    for p in photos:
        img = Image.fromarray(np.ascontiguousarray(p, dtype=np.uint8))
        for f in (1, 2, 4):
            out.append(np.asarray(img.resize((img.width // f, img.height // f), Image.Resampling.BOX)))
    return tuple(out)


def _photo(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    masks, labels = _digit_masks(n, rng, rot=15.0, scale=(0.85, 1.1), shift=2.0)
    photos = _photos()
    out = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for j in range(n):
        p = photos[rng.integers(len(photos))]
        y, x = rng.integers(p.shape[0] - SIZE + 1), rng.integers(p.shape[1] - SIZE + 1)
        bg = p[y : y + SIZE, x : x + SIZE].astype(np.float64)
        out[j] = _to_uint8(np.abs(bg - 255.0 * masks[j][..., None]))
    return out, labels


def _font(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    labels = _balanced_labels(n, rng)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1) - 0.5
    out = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for j in range(n):
        size = int(rng.integers(24, 37))
        font = _font_file(_FONTS[rng.integers(len(_FONTS))], size)
        canvas, box = _render(str(labels[j]), font, stroke=int(rng.integers(0, size // 12 + 1)), gap=0.0)
        centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        k = (box[3] - box[1]) / (SIZE * rng.uniform(0.5, 0.8))  # the digit fills 50-80% of the height
        mask = _warp(canvas, centre, k, rng.uniform(-15, 15), rng.uniform(-2, 2, 2))
        fg, bg = _contrasting_colours(rng, 90.0)
        angle = rng.uniform(0, 2 * np.pi)
        gradient = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None] * rng.uniform(0, 50, 3)
        out[j] = _to_uint8(_compose(mask, bg + gradient, fg))
    return out, labels


def _street(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    labels = _balanced_labels(n, rng)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1) - 0.5
    out = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for j in range(n):
        left, right = (str(d) if rng.random() < 0.85 else " " for d in rng.integers(0, 10, 2))
        font = _font_file(_STREET_FONTS[rng.integers(len(_STREET_FONTS))], int(rng.integers(24, 33)))
        text = left + str(labels[j]) + right
        canvas, box = _render(text, font, stroke=int(rng.integers(0, 2)), gap=rng.uniform(1, 5))
        centre = ((box[0] + box[2]) / 2 + rng.uniform(-1.5, 1.5), (box[1] + box[3]) / 2 + rng.uniform(-1.5, 1.5))
        k = (box[3] - box[1]) / (SIZE * rng.uniform(0.6, 0.8))  # the digit fills 60-80% of the height
        mask = _warp(canvas, centre, k, rng.uniform(-6, 6))
        fg, bg = _contrasting_colours(rng, 60.0)
        angle = rng.uniform(0, 2 * np.pi)
        light = 1.0 + (np.cos(angle) * xx + np.sin(angle) * yy)[..., None] * rng.uniform(0.2, 0.7)
        img = Image.fromarray(_to_uint8(_compose(mask, np.broadcast_to(bg, (SIZE, SIZE, 3)), fg) * light))
        img = np.asarray(img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.1))), np.float64)
        out[j] = _to_uint8(img + rng.normal(0, rng.uniform(2, 9), img.shape))
    return out, labels
