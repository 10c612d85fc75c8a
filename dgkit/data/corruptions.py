"""Common corruptions at five severities (Hendrycks & Dietterich, ICLR 2019: CIFAR-10-C), built with
albumentations, and the ``<dataset>_c`` test sets (``digits_c`` on ``digits_dg``) rendered from any domain.

Albumentations 2.0.8 has a transform for each corruption family (``../shared/ENVIRONMENT.md``); only the
severity tables are ours. They follow CIFAR-10-C's constants where the parameterisation matches (noise
sigma, impulse amount, JPEG quality, contrast factor, glass blur, zoom factors) and are scaled for 32 px images
elsewhere (contrast is hand-written, see :func:`_contrast`). ``frost`` has no albumentations equivalent
(CIFAR-10-C blends frost photographs): it is ``RandomSnow``'s texture mode, a frost-like icy overlay, and
``snow`` its bleach mode; ``fog`` is ``RandomFog`` (particles), not CIFAR-10-C's plasma fractal.

A corrupted set is rendered once, offline, image by image in dataset order with ``Compose(seed=...)`` keyed
on ``(seed, domain, corruption, severity)``, so it is identical from run to run, and cached under
``<root>/<dataset>_c/<domain>-<source checksum>/`` by :func:`dgkit.data.embedded.cache.load_or_generate`
(manifest + checksums).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import albumentations as A
import cv2
import numpy as np
from torch.utils.data import Dataset

from dgkit.data.benchmark import ArrayDataset, seed_hash
from dgkit.data.embedded.cache import array_checksum, load_or_generate

VERSION = "1"
SEVERITIES = (1, 2, 3, 4, 5)


def _pick(values: Sequence, severity: int):
    return values[severity - 1]


def _contrast(image: np.ndarray, factor: float, **_) -> np.ndarray:
    """CIFAR-10-C contrast: pull every pixel towards the image mean, ``(x - mean) * factor + mean``.

    Hand-written: albumentations' ``RandomBrightnessContrast`` scales towards 0 (``x * alpha``), which darkens.
    """
    x = image.astype(np.float32)
    mean = x.mean(axis=(0, 1), keepdims=True)
    return np.clip((x - mean) * factor + mean, 0, 255).astype(np.uint8)


# name -> severity -> transform (p=1). Values are per severity 1..5.
CORRUPTIONS: dict[str, Callable[[int], A.BasicTransform]] = {
    # noise
    "gaussian_noise": lambda s: A.GaussNoise(std_range=(v := _pick((0.04, 0.06, 0.08, 0.09, 0.10), s), v), p=1),
    "shot_noise": lambda s: A.ShotNoise(scale_range=(v := _pick((0.02, 0.04, 0.07, 0.1, 0.15), s), v), p=1),
    "impulse_noise": lambda s: A.SaltAndPepper(amount=(v := _pick((0.01, 0.02, 0.03, 0.05, 0.07), s), v), p=1),
    # blur
    "defocus_blur": lambda s: A.Defocus(
        radius=(r := _pick((1, 2, 2, 3, 3), s), r), alias_blur=(a := _pick((0.1, 0.1, 0.5, 0.1, 0.5), s), a), p=1
    ),
    "glass_blur": lambda s: A.GlassBlur(
        sigma=_pick((0.05, 0.25, 0.4, 0.25, 0.4), s), max_delta=1, iterations=_pick((1, 1, 1, 2, 2), s), p=1
    ),
    "motion_blur": lambda s: A.MotionBlur(blur_limit=(k := _pick((3, 5, 7, 9, 11), s), k), p=1),
    "zoom_blur": lambda s: A.ZoomBlur(
        max_factor=(1.0, _pick((1.06, 1.11, 1.16, 1.21, 1.26), s)), step_factor=(0.01, 0.01), p=1
    ),
    # weather
    "snow": lambda s: A.RandomSnow(
        snow_point_range=(v := _pick((0.1, 0.2, 0.3, 0.4, 0.5), s), v), brightness_coeff=2.0, method="bleach", p=1
    ),
    "frost": lambda s: A.RandomSnow(
        snow_point_range=(v := _pick((0.1, 0.2, 0.3, 0.4, 0.5), s), v), brightness_coeff=1.5, method="texture", p=1
    ),
    "fog": lambda s: A.RandomFog(
        fog_coef_range=(v := _pick((0.3, 0.4, 0.5, 0.6, 0.7), s), v),
        alpha_coef=_pick((0.05, 0.1, 0.15, 0.2, 0.25), s),
        p=1,
    ),
    # digital
    "brightness": lambda s: A.RandomBrightnessContrast(
        brightness_limit=(v := _pick((0.1, 0.2, 0.3, 0.4, 0.5), s), v), contrast_limit=(0, 0), p=1
    ),
    "contrast": lambda s: A.Lambda(image=partial(_contrast, factor=_pick((0.75, 0.5, 0.4, 0.3, 0.15), s)), p=1),
    "elastic_transform": lambda s: A.ElasticTransform(alpha=_pick((10, 20, 30, 40, 50), s), sigma=5.0, p=1),
    "pixelate": lambda s: A.Downscale(  # 32 px -> 24, 16, 12, 10, 8 px and back (whole pixels: no aliasing jumps)
        scale_range=(v := _pick((0.75, 0.5, 0.375, 0.3125, 0.25), s), v),
        interpolation_pair={"downscale": cv2.INTER_AREA, "upscale": cv2.INTER_NEAREST},
        p=1,
    ),
    "jpeg_compression": lambda s: A.ImageCompression(quality_range=(q := _pick((80, 65, 58, 50, 40), s), q), p=1),
}


def corruption(name: str, severity: int, seed: int = 0) -> A.Compose:
    """The seeded pipeline applying corruption ``name`` at ``severity`` (1-5) to uint8 ``(H, W, 3)`` images."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {sorted(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"corruption severity {severity} must be one of {list(SEVERITIES)}")
    return A.Compose([CORRUPTIONS[name](severity)], seed=seed)


def render(images: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """``images (N, H, W, 3) uint8`` under the corruption, one after another in order (deterministic)."""
    pipeline = corruption(name, severity, seed)
    out = np.empty_like(images)
    for i, image in enumerate(images):
        out[i] = np.clip(pipeline(image=image)["image"], 0, 255).astype(np.uint8)
    return out


def _arrays(dataset: Dataset, max_images: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The dataset's uint8 images and labels, or a seeded subset of ``max_images`` of them (sorted order)."""
    idx = np.arange(len(dataset))
    if max_images is not None and max_images < len(idx):
        idx = np.sort(np.random.RandomState(seed).choice(idx, size=max_images, replace=False))
    pairs = [dataset[int(i)] for i in idx]
    return np.stack([np.asarray(p[0], dtype=np.uint8) for p in pairs]), np.asarray([p[1] for p in pairs])


def corrupted_sets(
    dataset: Dataset,
    dataset_name: str,
    domain: str,
    root: str,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = SEVERITIES,
    max_images: int | None = None,
    seed: int = 0,
) -> dict[str, ArrayDataset]:
    """``{"<domain>/<corruption>-<severity>": ArrayDataset}``: ``dataset`` (uint8 images) under every corruption
    and severity, cached under ``root/<dataset_name>_c/<domain>-<checksum>/``.

    Args:
        dataset: a domain's (or split's) ``(uint8 image, label)`` items.
        dataset_name, domain: name the cache folder and the test sets.
        root: the data root (``paths.datasets``).
        corruptions: names from :data:`CORRUPTIONS` (``None``: all 15).
        severities: from 1 (mild) to 5 (severe).
        max_images: render a seeded subset of this many images (``None``: all).
        seed: the subset's and the corruptions' seed.
    """
    names = list(corruptions) if corruptions else list(CORRUPTIONS)
    for name in names:
        corruption(name, 1)  # validate names early
    for s in severities:
        corruption(names[0], int(s))
    if len(dataset) == 0:
        raise ValueError(f"domain {domain!r} has no images to corrupt")
    images, labels = _arrays(dataset, max_images, seed_hash(seed, domain, "subset"))
    params = {"source": array_checksum(images, labels), "names": names, "severities": list(severities), "seed": seed}

    def generate() -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {
            f"{n}-{s}": (render(images, n, int(s), seed_hash(seed, domain, n, int(s))), labels)
            for n in names
            for s in severities
        }

    # one folder per source set (e.g. each seed's 'in' split), so evaluating several runs does not thrash the cache
    arrays = load_or_generate(f"{dataset_name}_c/{domain}-{params['source'][:8]}", root, generate, VERSION, params)
    return {f"{domain}/{key}": ArrayDataset(x, y) for key, (x, y) in arrays.items()}
