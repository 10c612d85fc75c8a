"""Benchmark factories named by ``conf/data/*.yaml`` (``benchmark._target_``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from dgkit.data.benchmark import ArrayDataset, Benchmark, MaskArrayDataset
from dgkit.data.embedded import digits_dg as _digits_dg
from dgkit.data.embedded import hist_maps as _hist_maps
from dgkit.data.embedded import rotated_digits as _rotated_digits
from dgkit.data.embedded import sam_corpus as _sam_corpus
from dgkit.data.embedded import synthetic as _synthetic
from dgkit.data.embedded.cache import array_checksum
from dgkit.data.folder import folder_benchmark
from dgkit.data.seg_folder import seg_folder_benchmark

DIGIT_CLASSES = [str(i) for i in range(10)]


def _from_arrays(name: str, arrays: dict, classes: list[str]) -> Benchmark:
    checksums = "".join(f"{d}:{array_checksum(images, labels)};" for d, (images, labels) in arrays.items())
    return Benchmark(
        name=name,
        domains=list(arrays),
        classes=classes,
        datasets={d: ArrayDataset(images, labels) for d, (images, labels) in arrays.items()},
        fingerprint=hashlib.sha1(checksums.encode()).hexdigest()[:16],
    )


def digits_dg(root: str | Path = "datasets", n_per_domain: int = 1797, seed: int = 0) -> Benchmark:
    """Four digit styles (ink, photo, font, street), generated offline into ``root/digits_dg``."""
    return _from_arrays("digits_dg", _digits_dg.load(root, n_per_domain=n_per_domain, seed=seed), DIGIT_CLASSES)


def rotated_digits(root: str | Path = "datasets", seed: int = 0) -> Benchmark:
    """RotatedMNIST protocol on scikit-learn's digits (0-75 degrees), generated into ``root/rotated_digits``."""
    return _from_arrays("rotated_digits", _rotated_digits.load(root, seed=seed), DIGIT_CLASSES)


def synthetic(n_per_domain: int = 48, size: int = 16, num_classes: int = 3, seed: int = 0) -> Benchmark:
    """A tiny in-memory 3-domain benchmark for tests."""
    arrays = _synthetic.generate(n_per_domain=n_per_domain, size=size, num_classes=num_classes, seed=seed)
    return _from_arrays("synthetic", arrays, [f"c{i}" for i in range(num_classes)])


def folder(
    root: str | Path,
    domains: list[str] | None = None,
    name: str = "folder",
    verify: bool = True,
    on_bad_image: str = "error",
    cache: int | None = None,
) -> Benchmark:
    """A ``root/<domain>/<class>/<image>`` tree (PACS, VLCS, OfficeHome, TerraIncognita, DomainNet, your own);
    ``verify`` checks every image header first (``on_bad_image``: ``error`` or ``skip``); ``cache`` reads the
    decoded cache of that side (``scripts/prepare_cache.py``) instead of decoding the files."""
    return folder_benchmark(root, domains=domains, name=name, verify=verify, on_bad_image=on_bad_image, cache=cache)


def seg_folder(
    root: str | Path,
    num_classes: int,
    domains: list[str] | None = None,
    class_names: list[str] | None = None,
    name: str = "seg_folder",
    verify: bool = True,
) -> Benchmark:
    """A ``root/<domain>/{images,masks}/`` segmentation tree; ``verify`` checks every image/mask pair first."""
    return seg_folder_benchmark(root, num_classes, domains=domains, class_names=class_names, name=name, verify=verify)


def hist_maps(
    root: str | Path = "datasets", variant: str = "hist_maps", n_per_domain: int = 400, seed: int = 0
) -> Benchmark:
    """Synthetic historical-map tiles in four styles (modern, ink, sepia, hatched), 128 px, generated into
    ``root/hist_maps``: ``variant`` ``hist_maps`` (background / linear / areal), ``hist_maps_linear`` or
    ``hist_maps_areal`` (that class against the rest)."""
    if variant not in _hist_maps.VARIANTS:
        raise ValueError(f"data.variant={variant!r}; choose one of {list(_hist_maps.VARIANTS)}")
    arrays = _hist_maps.load(root, n_per_domain=n_per_domain, seed=seed)
    foreground = _hist_maps.VARIANTS[variant]
    if foreground is not None:
        arrays = {d: (x, _hist_maps.binary(m, foreground)) for d, (x, m) in arrays.items()}
    classes = list(_hist_maps.CLASSES) if foreground is None else ["background", _hist_maps.CLASSES[foreground]]
    checksums = "".join(f"{d}:{array_checksum(x, m)};" for d, (x, m) in arrays.items())
    return Benchmark(
        name=variant,
        domains=list(arrays),
        classes=classes,
        datasets={d: MaskArrayDataset(x, m) for d, (x, m) in arrays.items()},
        fingerprint=hashlib.sha1(checksums.encode()).hexdigest()[:16],
    )


def sam_corpus(root: str | Path = "datasets", n_per_domain: int = 1000, seed: int = 0) -> Benchmark:
    """A promptable-segmentation corpus for pre-training SAM (shapes with photo and procedural textures on photo
    crops; three photo families as domains), 128 px, generated into ``root/sam_corpus``. Masks hold instance ids
    (0 background, 1..8 objects), read by ``task=promptable`` and ``method=sam_pretrain``."""
    arrays = _sam_corpus.load(root, n_per_domain=n_per_domain, seed=seed)
    checksums = "".join(f"{d}:{array_checksum(x, m)};" for d, (x, m) in arrays.items())
    return Benchmark(
        name="sam_corpus",
        domains=list(arrays),
        classes=list(_sam_corpus.CLASSES),
        datasets={d: MaskArrayDataset(x, m) for d, (x, m) in arrays.items()},
        fingerprint=hashlib.sha1(checksums.encode()).hexdigest()[:16],
    )
