"""rotated_digits: the RotatedMNIST protocol on scikit-learn's handwritten digits, generated offline.

RotatedMNIST (Ghifary et al. 2015, as in DomainBed) splits MNIST into six disjoint parts and rotates
part ``i`` by ``15 * i`` degrees. MNIST needs a download, so this applies the same protocol to the 1797
8x8 digits of ``sklearn.datasets.load_digits``: shuffled once with ``seed``, split into six disjoint parts
(299-300 images), each digit upsampled to a 20x20 box centred in a 28x28 frame (MNIST's framing, so a
45-degree turn does not clip it), then rotated counter-clockwise by the domain's angle. White digit on
black, stored as three identical channels (``uint8``, 28x28x3).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dgkit.data.embedded.cache import load_or_generate

DOMAINS = ("0", "15", "30", "45", "60", "75")
VERSION = "1"
SIZE = 28
BOX = 20


def split_indices(seed: int = 0) -> dict[str, np.ndarray]:
    """Which of scikit-learn's 1797 digits each domain is built from (disjoint, covering all of them)."""
    order = np.random.default_rng(seed).permutation(1797)
    return dict(zip(DOMAINS, np.array_split(order, len(DOMAINS))))


def upright(image: np.ndarray) -> np.ndarray:
    """One 8x8 digit (values 0-16) as an unrotated 28x28 ``float32`` image in [0, 255] (MNIST framing)."""
    img = Image.fromarray((image * (255.0 / 16.0)).astype(np.float32))
    img = img.resize((BOX, BOX), Image.Resampling.BICUBIC)
    frame = np.zeros((SIZE, SIZE), np.float32)
    pad = (SIZE - BOX) // 2
    frame[pad : pad + BOX, pad : pad + BOX] = np.clip(np.asarray(img), 0.0, 255.0)  # bicubic overshoots
    return frame


def _rotate(frame: np.ndarray, angle: float) -> np.ndarray:
    rotated = Image.fromarray(frame).rotate(angle, resample=Image.Resampling.BILINEAR)  # counter-clockwise
    return np.clip(np.rint(np.asarray(rotated)), 0, 255).astype(np.uint8)


def generate(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """All six domains: ``{angle: (images uint8 (~300, 28, 28, 3), labels int64)}``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = {}
    for d, idx in split_indices(seed).items():
        gray = np.stack([_rotate(upright(digits.images[i]), float(d)) for i in idx])
        out[d] = (np.repeat(gray[..., None], 3, axis=-1), digits.target[idx].astype(np.int64))
    return out


def load(root: str | Path, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Load ``root/rotated_digits``, generating it first if it is missing, stale or damaged."""
    return load_or_generate("rotated_digits", root, lambda: generate(seed), VERSION, {"seed": seed})
