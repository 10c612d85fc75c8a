"""Training subsets of a source domain: few labels per class (``data.labels_per_class``) or few shots per domain
(``data.shots``), each drawn with a seed keyed on ``(seed, domain, option)``, so the subset does not depend on
which domains are held out. Used by :class:`~dgkit.data.datamodule.DGDataModule`."""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from dgkit.data.benchmark import seed_hash


def labels_of(dataset: Dataset) -> np.ndarray:
    """Every label of a benchmark dataset, from its ``labels`` array when it has one (no image decoding)."""
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = [dataset[i][1] for i in range(len(dataset))]
    return np.asarray(labels, dtype=np.int64)


def seeded_subset(
    indices: np.ndarray, k: int, seed: int, domain: str, key: str, labels: np.ndarray | None = None
) -> np.ndarray:
    """``k`` of ``indices`` (sorted), drawn without replacement by a generator seeded on ``(seed, domain, key)``;
    with ``labels``, ``k`` per class. ``key`` names the option that asked (``labels_per_class``, ``shots``), so each
    option draws its own subset; the draw depends on the seed and the domain only, not on which domains are held out.

    Raises:
        ValueError: fewer than ``k`` images to draw from (per class with ``labels``), naming the option, the domain
            and how many it has.
    """
    rng = np.random.RandomState(seed_hash(seed, domain, key))
    if labels is None:
        if len(indices) < k:
            raise ValueError(
                f"data.{key}={k}: source domain {domain!r} has only {len(indices)} images in its 'in' (training) "
                f"split; lower data.{key} (or data.holdout_fraction)"
            )
        return np.sort(rng.choice(indices, size=k, replace=False))
    picked = []
    for c in np.unique(labels):
        pool = indices[labels[indices] == c]
        if len(pool) < k:
            raise ValueError(f"data.{key}={k}: domain {domain!r} has only {len(pool)} training images of class {c}")
        picked.append(rng.choice(pool, size=k, replace=False))
    return np.sort(np.concatenate(picked))


def few_labels(indices: np.ndarray, labels: np.ndarray, k: int, seed: int, domain: str) -> np.ndarray:
    """``k`` of ``indices`` per class (sorted), drawn with a seed keyed on ``(seed, domain)``
    (:func:`seeded_subset` for ``data.labels_per_class``).

    Raises:
        ValueError: a class has fewer than ``k`` images among ``indices``.
    """
    return seeded_subset(indices, k, seed, domain, "labels_per_class", labels)


def few_shots(indices: np.ndarray, k: int, seed: int, domain: str) -> np.ndarray:
    """``k`` of ``indices`` whatever their labels (sorted), drawn with a seed keyed on ``(seed, domain)``
    (:func:`seeded_subset` for ``data.shots``): works for class labels and segmentation masks alike.

    Raises:
        ValueError: ``indices`` has fewer than ``k`` images (the domain and its size are named).
    """
    return seeded_subset(indices, k, seed, domain, "shots")
