"""sam_corpus: a generated promptable-segmentation corpus for pre-training SAM offline (Kirillov et al., ICCV 2023).

SA-1B cannot be downloaded here, so ``+exp=sam_tiny_pretrain`` trains on this stand-in: 128 px images whose
backgrounds are random crops (rescaled, flipped, colour-jittered) of scikit-image's bundled photos, with 2-8 random
shapes pasted over them (ellipses, polygons, stars, thin curves, rings), each filled with a texture cut from another
photo or a procedural one (stripes, smooth noise, flat colour). Later shapes occlude earlier ones. The mask stores
instance ids: 0 background, ``1..K`` objects (visible parts only, renumbered in paint order, fully hidden objects
dropped). Nothing of a map (paper, hatching, map colours): the corpus is what a generic segmenter learns from, and
hist_maps stays an unseen style.

Domains are photo families, so the DataModule's leave-one-domain-out protocol measures generalisation to unseen
backgrounds and textures (object textures come from the image's own family or are procedural):

- ``everyday``: astronaut, chelsea, coffee, rocket, camera, stereo_motorcycle, clock;
- ``science``: hubble_deep_field, immunohistochemistry, retina, moon, cell;
- ``surfaces``: brick, grass, gravel, coins.

Every domain draws from ``np.random.default_rng([seed, domain_index])``; images are ``uint8 (128, 128, 3)``,
masks ``uint8 (128, 128)``. Cached under ``datasets/sam_corpus`` like the other embedded benchmarks.
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dgkit.data.embedded.cache import load_or_generate

FAMILIES = {
    "everyday": ("astronaut", "chelsea", "coffee", "rocket", "camera", "stereo_motorcycle", "clock"),
    "science": ("hubble_deep_field", "immunohistochemistry", "retina", "moon", "cell"),
    "surfaces": ("brick", "grass", "gravel", "coins"),
}
DOMAINS = tuple(FAMILIES)
VERSION = "1"
SIZE = 128
MAX_OBJECTS = 8
CLASSES = ("background", *(f"object_{i}" for i in range(1, MAX_OBJECTS + 1)))
"""Mask values: 0 background, ``k`` the k-th visible object (instance ids, not semantic classes)."""
_GRID = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)  # (2, H, W): row and column of every pixel
SHAPES = ("ellipse", "polygon", "star", "curve", "ring")
FILLS = ("photo", "stripes", "noise", "flat")


@cache
def _photo(name: str) -> np.ndarray:
    """A scikit-image photo as ``uint8 (H, W, 3)`` (grey ones repeated to 3 channels)."""
    import skimage.data

    img = getattr(skimage.data, name)()
    img = np.asarray(img[0] if isinstance(img, tuple) else img)  # stereo_motorcycle: (left, right, disparity)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


def generate(n_per_domain: int = 1000, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """All three families: ``{domain: (images uint8 (n, 128, 128, 3), instance masks uint8 (n, 128, 128))}``."""
    out = {}
    for i, d in enumerate(DOMAINS):
        rng = np.random.default_rng([seed, i])
        samples = [sample(rng, d) for _ in range(n_per_domain)]
        out[d] = (np.stack([x for x, _ in samples]), np.stack([m for _, m in samples]))
    return out


def load(root: str | Path, n_per_domain: int = 1000, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Load ``root/sam_corpus``, generating it first if missing, stale or damaged."""
    params = {"n_per_domain": n_per_domain, "seed": seed}
    return load_or_generate("sam_corpus", root, lambda: generate(n_per_domain, seed), VERSION, params)


def sample(rng: np.random.Generator, domain: str, effects: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One image of ``domain`` and its instance mask; ``effects=False`` skips the final blur and noise."""
    if domain not in FAMILIES:
        raise ValueError(f"sam_corpus domain {domain!r}; valid: {list(FAMILIES)}")
    background, layers = scene(rng, domain)
    image, ids = compose(background, layers)
    return (_camera(image, rng) if effects else image.astype(np.uint8)), ids


def scene(rng: np.random.Generator, domain: str) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """A background ``float32 (128, 128, 3)`` and 2-8 layers in paint order, each
    ``(shape mask bool (128, 128), fill float32 (128, 128, 3))``."""
    names = FAMILIES[domain]
    background = _crop(rng, names[int(rng.integers(len(names)))])
    layers = []
    for _ in range(int(rng.integers(2, MAX_OBJECTS + 1))):
        shape = _shape(rng, SHAPES[int(rng.integers(len(SHAPES)))])
        if shape.sum() < 12:  # a degenerate draw (a curve off the image): no object
            continue
        layers.append((shape, fill_texture(rng, FILLS[int(rng.integers(len(FILLS)))], names)))
    return background, layers


def compose(background: np.ndarray, layers: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Paint the layers in order (later ones occlude earlier ones): the image ``float32 (H, W, 3)`` (rounded to
    integers) and the instance ids ``uint8 (H, W)`` of the visible parts, renumbered ``1..K`` in paint order."""
    image = background.copy()
    owner = np.zeros(background.shape[:2], np.int64)  # layer index + 1 owning each pixel
    for k, (shape, fill) in enumerate(layers, start=1):
        image[shape] = fill[shape]
        owner[shape] = k
    visible = [k for k in range(1, len(layers) + 1) if (owner == k).any()]
    lut = np.zeros(len(layers) + 1, np.uint8)
    lut[visible] = np.arange(1, len(visible) + 1)
    return np.clip(np.round(image), 0, 255), lut[owner]


# ------------------------------------------------------------------------------------------------ textures


def _crop(rng: np.random.Generator, name: str, size: int = SIZE) -> np.ndarray:
    """A random crop of a photo, rescaled to ``size``, maybe flipped, colour-jittered: ``float32 (size, size, 3)``."""
    img = _photo(name)
    h, w = img.shape[:2]
    side = int(rng.integers(min(48, h, w), min(h, w) + 1))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    pil = Image.fromarray(img[y : y + side, x : x + side]).resize((size, size), Image.BILINEAR)
    out = np.asarray(pil, np.float32)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if rng.random() < 0.5:
        out = out[::-1]
    return _jitter(rng, out)


def _jitter(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Brightness, contrast, saturation and a random colour tint (grey photos get colour this way)."""
    grey = img.mean(axis=2, keepdims=True)
    img = grey + rng.uniform(0.3, 1.5) * (img - grey)  # saturation
    img = (img - img.mean()) * rng.uniform(0.6, 1.4) + img.mean() * rng.uniform(0.7, 1.3)  # contrast, brightness
    img = img * rng.uniform(0.75, 1.25, 3)  # tint
    return np.clip(img, 0, 255).astype(np.float32)


def fill_texture(rng: np.random.Generator, kind: str, names: tuple[str, ...]) -> np.ndarray:
    """An object's texture ``float32 (128, 128, 3)``: a photo crop of the family, stripes, smooth noise or flat."""
    if kind == "photo":
        return _crop(rng, names[int(rng.integers(len(names)))])
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    if kind == "flat":
        return np.broadcast_to(c1 + rng.normal(0, 4, (SIZE, SIZE, 1)), (SIZE, SIZE, 3)).astype(np.float32)
    if kind == "stripes":
        yy, xx = _GRID
        a, period = rng.uniform(0, math.pi), rng.uniform(4, 16)
        t = (0.5 + 0.5 * np.sin(2 * math.pi * (xx * math.cos(a) + yy * math.sin(a)) / period))[..., None]
    else:  # smooth noise: a coarse random grid upsampled
        cells = int(rng.integers(4, 17))
        grid = rng.uniform(0, 255, (cells, cells)).astype(np.uint8)
        t = np.asarray(Image.fromarray(grid).resize((SIZE, SIZE), Image.BICUBIC), np.float32)[..., None] / 255
    return (c1 * t + c2 * (1 - t)).astype(np.float32)


# -------------------------------------------------------------------------------------------------- shapes


def _shape(rng: np.random.Generator, kind: str) -> np.ndarray:
    """A binary shape ``bool (128, 128)``: rotated ellipse, random polygon, star, thick curve or ring."""
    m = Image.new("L", (SIZE, SIZE), 0)
    d = ImageDraw.Draw(m)
    cx, cy = rng.uniform(8, SIZE - 8, 2)
    r = rng.uniform(8, 40)
    if kind in ("ellipse", "ring"):
        a, ratio = rng.uniform(0, math.pi), rng.uniform(0.35, 1.0)
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        pts = _rotate(r * np.cos(t), r * ratio * np.sin(t), a, cx, cy)
        d.polygon(pts, fill=255)
        if kind == "ring":
            inner = _rotate(0.6 * r * np.cos(t), 0.6 * r * ratio * np.sin(t), a, cx, cy)
            d.polygon(inner, fill=0)
    elif kind == "polygon":
        n = int(rng.integers(3, 9))
        t = np.sort(rng.uniform(0, 2 * math.pi, n))
        rad = r * rng.uniform(0.5, 1.0, n)
        d.polygon(_rotate(rad * np.cos(t), rad * np.sin(t), 0.0, cx, cy), fill=255)
    elif kind == "star":
        n = int(rng.integers(4, 8))
        t = np.linspace(0, 2 * math.pi, 2 * n, endpoint=False) + rng.uniform(0, math.pi)
        rad = np.where(np.arange(2 * n) % 2 == 0, r, r * rng.uniform(0.3, 0.6))
        d.polygon(_rotate(rad * np.cos(t), rad * np.sin(t), 0.0, cx, cy), fill=255)
    elif kind == "curve":
        heading, pts = rng.uniform(0, 2 * math.pi), [(cx, cy)]
        for _ in range(int(rng.integers(3, 9))):
            heading += rng.normal(0, 0.6)
            step = rng.uniform(8, 20)
            pts.append((pts[-1][0] + step * math.cos(heading), pts[-1][1] + step * math.sin(heading)))
        d.line(pts, fill=255, width=int(rng.integers(2, 7)), joint="curve")
    else:
        raise ValueError(f"shape {kind!r}; valid: {list(SHAPES)}")
    return np.asarray(m) > 127


def _rotate(x: np.ndarray, y: np.ndarray, a: float, cx: float, cy: float) -> list[tuple[float, float]]:
    c, s = math.cos(a), math.sin(a)
    return [(float(cx + u * c - v * s), float(cy + u * s + v * c)) for u, v in zip(x, y)]


def _camera(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A mild camera: blur with random strength (sometimes none) and sensor noise; ``uint8``."""
    pil = Image.fromarray(image.astype(np.uint8))
    if rng.random() < 0.6:
        pil = pil.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
    out = np.asarray(pil, np.float32) + rng.normal(0, rng.uniform(0, 6), (SIZE, SIZE, 1)).astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)
