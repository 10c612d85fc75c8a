"""synthetic: a tiny in-memory 3-domain benchmark for fast tests and smoke runs (never written to disk).

The class is the orientation of a bright bar (class ``k`` of ``K`` is tilted ``180 * k / K`` degrees, give
or take a few); the domain is the look around it: ``a`` a white bar on a dark plain background, ``b`` a
yellow bar on a noisy blue background, ``c`` a pale green bar over dim coloured rings. The label is
therefore learnable by a tiny model within a few dozen steps and transfers across domains, while the
domains differ clearly in colour and texture. Generated with vectorised NumPy in milliseconds.
"""

from __future__ import annotations

import numpy as np

DOMAINS = ("a", "b", "c")


def generate(
    n_per_domain: int = 48, size: int = 16, num_classes: int = 3, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{domain: (images uint8 (n, size, size, 3), labels int64 (n,))}`` for domains ``a``, ``b``, ``c``."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    return {
        d: _domain(i, n_per_domain, size, num_classes, np.random.default_rng([seed, i])) for i, d in enumerate(DOMAINS)
    }


def _bars(labels: np.ndarray, size: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Soft [0, 1] masks of one bar per image, tilted by its class, jittered in angle, offset and length."""
    n = len(labels)
    theta = np.pi * (labels + rng.uniform(-0.15, 0.15, n)) / num_classes
    centre = (size - 1) / 2 + rng.uniform(-size / 10, size / 10, (n, 2))
    half_len, half_width = size * rng.uniform(0.3, 0.42, n), size * rng.uniform(0.06, 0.1, n)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dx = xx[None] - centre[:, 0, None, None]
    dy = yy[None] - centre[:, 1, None, None]
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    along, across = np.abs(cos * dx + sin * dy), np.abs(-sin * dx + cos * dy)
    # one pixel of soft edge on each side
    inside_len = np.clip(half_len[:, None, None] + 0.5 - along, 0.0, 1.0)
    inside_width = np.clip(half_width[:, None, None] + 0.5 - across, 0.0, 1.0)
    return inside_len * inside_width


def _domain(index: int, n: int, size: int, num_classes: int, rng: np.random.Generator):
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
    mask = _bars(labels, size, num_classes, rng)[..., None]
    if index == 0:  # white bar, dark plain background
        bg = rng.uniform(0, 40, (n, 1, 1, 1)) + rng.normal(0, 4, (n, size, size, 1))
        colour = np.array([240.0, 240.0, 240.0])
    elif index == 1:  # yellow bar, noisy blue background
        bg = np.array([30.0, 60.0, 150.0]) + rng.normal(0, 25, (n, size, size, 3))
        colour = np.array([250.0, 220.0, 40.0])
    else:  # pale green bar over dim coloured rings around a random point (a texture with no one orientation)
        yy, xx = np.mgrid[0:size, 0:size] / size
        cx, cy = rng.uniform(-0.5, 1.5, (2, n, 1, 1))
        freq, phase = rng.uniform(1.5, 3.5, (n, 1, 1)), rng.uniform(0, 2 * np.pi, (n, 1, 1))
        wave = np.sin(2 * np.pi * freq * np.hypot(xx - cx, yy - cy) + phase)
        bg = rng.uniform(30, 130, (n, 1, 1, 3)) + 25 * wave[..., None]
        colour = np.array([150.0, 250.0, 160.0])
    images = bg * (1 - mask) + colour * mask
    return np.clip(np.rint(images), 0, 255).astype(np.uint8), labels
