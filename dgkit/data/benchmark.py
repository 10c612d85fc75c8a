"""A benchmark is an ordered list of named domains, each a dataset of ``(image, label)``.

Images are ``uint8`` arrays ``(H, W, 3)``; transforms are applied later by the DataModule, from the
backbone's ``data_config``. Splits follow DomainBed: each domain is shuffled with a seed keyed on
``(seed, domain)`` and its first ``holdout_fraction`` becomes the ``out`` split, the rest ``in``, so a
domain's split never depends on which domain is held out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from torch.utils.data import Dataset

SPLITS = ("in", "out")


@dataclass
class Benchmark:
    """Named domains sharing one label space.

    Attributes:
        name: benchmark name, recorded with every result (``digits_dg``, ``PACS``...).
        domains: domain names in their canonical order.
        classes: class names; label ``i`` is ``classes[i]``.
        datasets: ``{domain: Dataset of (uint8 HWC image, int label)}``.
        fingerprint: a short hash of the data (files and sizes, or array checksums): part of a run's identity,
            so a run folder is never resumed with other data; ``None`` when the benchmark cannot tell.
        skipped: files left out as unreadable (``data.on_bad_image=skip``).
    """

    name: str
    domains: list[str]
    classes: list[str]
    datasets: dict[str, Dataset]
    fingerprint: str | None = None
    skipped: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)


class ArrayDataset(Dataset):
    """In-memory images ``(N, H, W, 3) uint8`` with integer labels ``(N,)``.

    It declares ``in_memory``: training batches are then augmented as tensors (:mod:`dgkit.data.batch_augment`).
    """

    in_memory = True

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])


class MaskArrayDataset(Dataset):
    """In-memory images ``(N, H, W, 3) uint8`` with segmentation masks ``(N, H, W) uint8`` (class ids, 255 =
    ignore); an item is ``(image, mask)``."""

    def __init__(self, images: np.ndarray, masks: np.ndarray) -> None:
        if images.shape[:3] != masks.shape:
            raise ValueError(f"images {images.shape} and masks {masks.shape} differ in (N, H, W)")
        self.images, self.masks = images, masks

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.images[i], self.masks[i]


def seed_hash(*args: object) -> int:
    """A stable 31-bit seed from any printable arguments (DomainBed's ``misc.seed_hash``)."""
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2**31)


def split_indices(n: int, seed: int, domain: str, holdout_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``in`` and ``out`` split of a domain of ``n`` items.

    The permutation is keyed on ``(seed, domain)``; ``out`` takes the first ``floor(holdout_fraction * n)``.
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"data.holdout_fraction={holdout_fraction} must be in [0, 1)")
    perm = np.random.RandomState(seed_hash(seed, domain)).permutation(n)
    n_out = int(n * holdout_fraction)
    return np.sort(perm[n_out:]), np.sort(perm[:n_out])


def eval_splits(domains: Sequence[str]) -> list[tuple[str, str]]:
    """The evaluation order shared by the DataModule and the methods: every domain, ``in`` then ``out``."""
    return [(d, s) for d in domains for s in SPLITS]


def resolve_test_domains(test_domains: Sequence[str | int] | str | int, domains: Sequence[str]) -> list[str]:
    """Map ``data.test_domains`` (names or indices) to names; reject unknown names and holding out everything."""
    if isinstance(test_domains, str | int):
        test_domains = [test_domains]
    names: list[str] = []
    for t in test_domains:
        if isinstance(t, int) and not isinstance(t, bool) and str(t) not in domains:
            if not 0 <= t < len(domains):
                raise ValueError(f"data.test_domains: index {t} out of range; domains are {list(domains)}")
            t = domains[t]
        t = str(t)
        if t not in domains:
            raise ValueError(f"data.test_domains: unknown domain {t!r}; valid domains are {list(domains)}")
        if t not in names:
            names.append(t)
    if not names:
        raise ValueError(f"data.test_domains is empty; name at least one of {list(domains)}")
    if len(names) >= len(domains):
        raise ValueError(f"data.test_domains={names} holds out every domain; leave at least one of them as a source")
    return names
