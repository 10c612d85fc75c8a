"""hist_maps: synthetic historical-map tiles for segmentation, in four cartographic styles (MapSAM's setting).

A stand-in for the historical-map benchmarks of MapSAM (Xia et al., arXiv 2411.06971: Siegfried map sheets),
which cannot be downloaded here. Each 128x128 tile holds a random scene drawn from the same geometry generator
in every domain, with three classes:

- 0 background (paper, labels of nothing);
- 1 linear features (polylines): roads, railways, rivers;
- 2 areal features (polygons): buildings, vineyards, water.

Linear features are drawn over areal ones, in the image and in the mask alike. The domains are cartographic
styles of the same kind of scene:

- ``modern``: clean colours on white (red buildings, green vineyards, blue water, orange roads);
- ``ink``: black line art (outlines, double-line roads, ticked railways) on textured paper;
- ``sepia``: aged yellow-brown paper with stains, faded brown ink and fills, low contrast;
- ``hatched``: areas filled with hatching (angle per feature kind), dashed roads.

Scan artefacts on every tile: paper grain, Gaussian blur and JPEG compression with random strength. The binary
variants ``hist_maps_linear`` and ``hist_maps_areal`` read the same tiles with the mask of one class (as MapSAM
trains one model per feature kind). Every domain draws from ``np.random.default_rng([seed, domain_index])``;
tiles are ``uint8 (128, 128, 3)``, masks ``uint8 (128, 128)``.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dgkit.data.embedded.cache import load_or_generate

DOMAINS = ("modern", "ink", "sepia", "hatched")
CLASSES = ("background", "linear", "areal")
VERSION = "1"
SIZE = 128
LINEAR, AREAL = 1, 2
VARIANTS = {"hist_maps": None, "hist_maps_linear": LINEAR, "hist_maps_areal": AREAL}
"""Benchmark name -> the class kept as foreground (``None``: all three classes)."""

_AREAL_KINDS = ("building", "vineyard", "water")
_LINEAR_KINDS = ("road", "railway", "river")


def generate(n_per_domain: int = 400, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """All four styles: ``{domain: (tiles uint8 (n, 128, 128, 3), masks uint8 (n, 128, 128))}``."""
    out = {}
    for i, d in enumerate(DOMAINS):
        rng = np.random.default_rng([seed, i])
        tiles = [_tile(d, rng) for _ in range(n_per_domain)]
        out[d] = (np.stack([t for t, _ in tiles]), np.stack([m for _, m in tiles]))
    return out


def load(root: str | Path, n_per_domain: int = 400, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Load ``root/hist_maps`` (three-class masks), generating it first if missing, stale or damaged."""
    params = {"n_per_domain": n_per_domain, "seed": seed}
    return load_or_generate("hist_maps", root, lambda: generate(n_per_domain, seed), VERSION, params)


def binary(masks: np.ndarray, foreground: int) -> np.ndarray:
    """Masks of one class against the rest: 1 where ``masks == foreground``, else 0."""
    return (masks == foreground).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- geometry


def _polygon(rng: np.random.Generator, kind: str) -> list[tuple[float, float]]:
    """A building (rotated rectangle), vineyard (convex quadrilateral) or water body (irregular blob)."""
    cx, cy = rng.uniform(10, SIZE - 10, 2)
    if kind == "building":
        w, h, a = rng.uniform(10, 26), rng.uniform(8, 18), rng.uniform(0, math.pi)
        corners = [(-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)]
        c, s = math.cos(a), math.sin(a)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners]
    n = 4 if kind == "vineyard" else int(rng.integers(7, 12))
    radius = rng.uniform(14, 30) if kind == "vineyard" else rng.uniform(10, 26)
    angles = np.sort(rng.uniform(0, 2 * math.pi, n))
    radii = radius * (rng.uniform(0.8, 1.0, n) if kind == "vineyard" else rng.uniform(0.55, 1.0, n))
    return [(cx + r * math.cos(t), cy + r * math.sin(t)) for r, t in zip(radii, angles)]


def _polyline(rng: np.random.Generator, kind: str) -> list[tuple[float, float]]:
    """A path across the tile: from one edge to another, straight-ish (roads, railways) or winding (rivers)."""
    start = rng.uniform(10, SIZE - 10, 2)
    heading = rng.uniform(0, 2 * math.pi)
    bend = {"road": 0.25, "railway": 0.06, "river": 0.5}[kind]
    points = [tuple(start)]
    for _ in range(14):
        heading += rng.normal(0, bend)
        step = rng.uniform(10, 18)
        start = start + step * np.array([math.cos(heading), math.sin(heading)])
        points.append(tuple(start))
    return points


def _width(kind: str, rng: np.random.Generator) -> int:
    return int({"road": rng.integers(3, 6), "railway": rng.integers(2, 4), "river": rng.integers(2, 6)}[kind])


def _scene(rng: np.random.Generator) -> tuple[list, list]:
    """Areal features ``[(kind, polygon)]`` and linear ones ``[(kind, polyline, width)]`` of one tile."""
    areas = [(k, _polygon(rng, k)) for k in rng.choice(_AREAL_KINDS, int(rng.integers(2, 7)))]
    lines = [(k, _polyline(rng, k), 0) for k in rng.choice(_LINEAR_KINDS, int(rng.integers(2, 5)))]
    return areas, [(k, p, _width(k, rng)) for k, p, _ in lines]


# ------------------------------------------------------------------------------------------------ styles


def _hatch(draw_size: int, angle: float, spacing: int, colour, width: int = 1) -> Image.Image:
    """A transparent layer of parallel lines at ``angle`` (RGBA), to be clipped to a polygon."""
    layer = Image.new("RGBA", (draw_size, draw_size), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    c, s = math.cos(angle), math.sin(angle)
    for off in range(-2 * draw_size, 2 * draw_size, spacing):
        x0, y0 = off * -s + SIZE / 2 - 2 * SIZE * c, off * c + SIZE / 2 - 2 * SIZE * s
        d.line([(x0, y0), (x0 + 4 * SIZE * c, y0 + 4 * SIZE * s)], fill=colour, width=width)
    return layer


STYLES = {
    # paper, areal fills/outlines per kind, ink of lines per kind
    "modern": {
        "paper": (247, 246, 240),
        "fill": {"building": (205, 110, 105), "vineyard": (170, 205, 130), "water": (150, 195, 235)},
        "outline": {"building": (120, 50, 50), "vineyard": (90, 140, 70), "water": (70, 130, 200)},
        "line": {"road": (235, 150, 50), "railway": (60, 60, 60), "river": (60, 120, 210)},
    },
    "sepia": {
        "paper": (222, 200, 160),
        "fill": {"building": (175, 135, 95), "vineyard": (195, 170, 120), "water": (185, 170, 140)},
        "outline": {"building": (120, 85, 55), "vineyard": (140, 110, 75), "water": (130, 110, 85)},
        "line": {"road": (125, 90, 60), "railway": (100, 70, 45), "river": (135, 110, 85)},
    },
}
_INK = (25, 22, 20)


def _draw_modern(img: Image.Image, areas, lines, rng, style) -> None:
    d = ImageDraw.Draw(img)
    for kind, poly in areas:
        d.polygon(poly, fill=style["fill"][kind], outline=style["outline"][kind])
    for kind, line, w in lines:
        if kind == "road":
            d.line(line, fill=(110, 110, 110), width=w + 2, joint="curve")  # casing
            d.line(line, fill=style["line"][kind], width=w, joint="curve")
        elif kind == "railway":
            d.line(line, fill=style["line"][kind], width=w, joint="curve")
            d.line(line, fill=(240, 240, 240), width=max(1, w - 2))
        else:
            d.line(line, fill=style["line"][kind], width=w, joint="curve")


def _draw_ink(img: Image.Image, areas, lines, rng, paper) -> None:
    d = ImageDraw.Draw(img)
    for kind, poly in areas:
        d.polygon(poly, outline=_INK, width=1 if kind != "building" else 2)
        if kind == "water":  # horizontal shore lines inside water, as engravers drew them
            layer = _hatch(SIZE, 0.0, 4, _INK + (255,))
            img.paste(layer, (0, 0), _clip(poly, layer))
        if kind == "building":
            d.polygon(poly, fill=(60, 55, 50), outline=_INK)
    for kind, line, w in lines:
        d.line(line, fill=_INK, width=w, joint="curve")
        if kind == "road" and w >= 3:  # double-line road: paper between two ink lines
            d.line(line, fill=paper, width=w - 2, joint="curve")
        if kind == "railway":
            _ticks(d, line, w + 3, _INK)


def _draw_sepia(img: Image.Image, areas, lines, rng, style) -> None:
    d = ImageDraw.Draw(img)
    for kind, poly in areas:
        d.polygon(poly, fill=style["fill"][kind], outline=style["outline"][kind])
    for kind, line, w in lines:
        d.line(line, fill=style["line"][kind], width=w, joint="curve")
        if kind == "railway":
            _ticks(d, line, w + 2, style["line"][kind])


def _draw_hatched(img: Image.Image, areas, lines, rng, paper) -> None:
    d = ImageDraw.Draw(img)
    angles = {"building": math.pi / 4, "vineyard": -math.pi / 4, "water": 0.0}
    spacing = {"building": 3, "vineyard": 5, "water": 4}
    for kind, poly in areas:
        layer = _hatch(SIZE, angles[kind] + rng.normal(0, 0.1), spacing[kind], _INK + (255,))
        img.paste(layer, (0, 0), _clip(poly, layer))
        d.polygon(poly, outline=_INK)
    for kind, line, w in lines:
        if kind == "road":  # dashed: ink segments with paper gaps, the mask keeps the whole road
            d.line(line, fill=paper, width=w, joint="curve")
            _dashes(d, line, w, _INK)
        elif kind == "railway":
            d.line(line, fill=_INK, width=w)
            _ticks(d, line, w + 3, _INK)
        else:
            d.line(line, fill=_INK, width=1)
            d.line([(x + w / 2, y) for x, y in line], fill=_INK, width=1)


def _clip(poly, layer: Image.Image) -> Image.Image:
    """The alpha of ``layer`` inside ``poly`` only."""
    inside = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(inside).polygon(poly, fill=255)
    return Image.fromarray(np.minimum(np.asarray(inside), np.asarray(layer.getchannel("A"))))


def _segments(line):
    for (x0, y0), (x1, y1) in zip(line[:-1], line[1:]):
        yield x0, y0, x1, y1, math.hypot(x1 - x0, y1 - y0)


def _ticks(d: ImageDraw.ImageDraw, line, length: int, colour) -> None:
    """Cross ticks every 5 px along a polyline (railway sleepers)."""
    for x0, y0, x1, y1, n in _segments(line):
        if n == 0:
            continue
        ux, uy = (x1 - x0) / n, (y1 - y0) / n
        for t in np.arange(0, n, 5):
            cx, cy = x0 + ux * t, y0 + uy * t
            d.line([(cx - uy * length / 2, cy + ux * length / 2), (cx + uy * length / 2, cy - ux * length / 2)], colour)


def _dashes(d: ImageDraw.ImageDraw, line, width: int, colour) -> None:
    """Dashes 5 px long with 3 px gaps along a polyline."""
    for x0, y0, x1, y1, n in _segments(line):
        if n == 0:
            continue
        ux, uy = (x1 - x0) / n, (y1 - y0) / n
        for t in np.arange(0, n, 8):
            e = min(t + 5, n)
            d.line([(x0 + ux * t, y0 + uy * t), (x0 + ux * e, y0 + uy * e)], fill=colour, width=max(1, width - 1))


# -------------------------------------------------------------------------------------------------- tiles


def _mask(areas, lines) -> np.ndarray:
    m = Image.new("L", (SIZE, SIZE), 0)
    d = ImageDraw.Draw(m)
    for _, poly in areas:
        d.polygon(poly, fill=AREAL, outline=AREAL)
    for _, line, w in lines:
        d.line(line, fill=LINEAR, width=w, joint="curve")
    return np.asarray(m, np.uint8)


def _tile(domain: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One tile of ``domain`` and its three-class mask."""
    areas, lines = _scene(rng)
    if domain in STYLES:
        style = STYLES[domain]
        img = Image.new("RGB", (SIZE, SIZE), style["paper"])
        (_draw_modern if domain == "modern" else _draw_sepia)(img, areas, lines, rng, style)
    else:
        paper = tuple(int(v) for v in rng.integers([225, 215, 190], [245, 238, 220]))
        img = Image.new("RGB", (SIZE, SIZE), paper)
        (_draw_ink if domain == "ink" else _draw_hatched)(img, areas, lines, rng, paper)
    return _scan(np.asarray(img, np.float32), domain, rng), _mask(areas, lines)


def _stains(rng: np.random.Generator) -> np.ndarray:
    """A few soft brown stains (multiplicative, ``(H, W, 1)``) for aged paper."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    shade = np.ones((SIZE, SIZE), np.float32)
    for _ in range(int(rng.integers(1, 4))):
        cx, cy, r = rng.uniform(0, SIZE), rng.uniform(0, SIZE), rng.uniform(10, 40)
        shade -= rng.uniform(0.08, 0.22) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
    return shade[..., None]


def _scan(img: np.ndarray, domain: str, rng: np.random.Generator) -> np.ndarray:
    """Scan artefacts: fading and stains (sepia), paper grain, blur, JPEG."""
    if domain == "sepia":
        img = 0.55 * img + 0.45 * np.array([215, 190, 150], np.float32)  # faded ink
        img = img * _stains(rng)
    grain = {"modern": 4.0, "ink": 10.0, "sepia": 12.0, "hatched": 8.0}[domain]
    img = img + rng.normal(0, grain, (SIZE, SIZE, 1)).astype(np.float32)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    pil = pil.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.2, 1.0))))
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=int(rng.integers(35, 90)))
    buf.seek(0)
    with Image.open(buf) as jpeg:
        return np.asarray(jpeg.convert("RGB"), np.uint8).copy()
