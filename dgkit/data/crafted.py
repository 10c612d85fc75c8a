"""Crafted-shift validation sets (Efthymiadis et al., "Crafting Distribution Shifts for Validation and Training
in Single Source Domain Generalization", WACV 2025; NikosEfth/crafting-shifts).

The source domains' ``out`` images, each rendered under augmentation *families* that training never uses,
form a validation set whose shift stands in for the unseen domain's. As in the paper, one operation of a family
is drawn per image; the rendering is frozen (seeded by ``(seed, domain, family, image)``), so every evaluation
sees the same images. The families follow the paper's imgaug families, mapped to albumentations 2.0.8 where it
has an equivalent operation (``../shared`` notes, "Mapping to albumentations 2.x"); the families with no
equivalent (artistic, edges) are left out.

A family may not overlap the training augmentation (:data:`POLICY_FAMILIES`): a validation shift that training
already covers measures nothing. Select on it with :class:`dgkit.eval.selection.CraftedShiftValidation`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import albumentations as A
import numpy as np
from torch.utils.data import Dataset

from dgkit.data.benchmark import seed_hash

FAMILIES: dict[str, Callable[[], list[A.BasicTransform]]] = {
    "arithmetic": lambda: [
        A.GaussNoise(std_range=(0.2, 0.59), p=1.0),
        A.MultiplicativeNoise(multiplier=(2, 4), per_channel=True, elementwise=True, p=1.0),
        A.CoarseDropout(num_holes_range=(5, 10), hole_height_range=(0.2, 0.2), hole_width_range=(0.2, 0.2), p=1.0),
        A.SaltAndPepper(amount=(0.3, 0.5), p=1.0),
        A.InvertImg(p=1.0),
        A.Solarize(threshold_range=(32 / 255, 128 / 255), p=1.0),
        A.ImageCompression(quality_range=(1, 10), p=1.0),
    ],
    "blur": lambda: [
        A.GaussianBlur(sigma_limit=(5, 7), blur_limit=0, p=1.0),
        A.Blur(blur_limit=(9, 15), p=1.0),
        A.MedianBlur(blur_limit=(9, 15), p=1.0),
        A.MotionBlur(blur_limit=(15, 15), p=1.0),
    ],
    "color": lambda: [
        A.HueSaturationValue(hue_shift_limit=(50, 179), sat_shift_limit=0, val_shift_limit=0, p=1.0),
        A.PlanckianJitter(temperature_limit=(6000, 10000), p=1.0),
        A.Posterize(num_bits=(2, 4), p=1.0),
        A.ToGray(p=1.0),
    ],
    "contrast": lambda: [
        A.RandomGamma(gamma_limit=(10, 30), p=1.0),
        A.RandomGamma(gamma_limit=(180, 200), p=1.0),
        A.CLAHE(clip_limit=(1, 10), p=1.0),
    ],
    "convolutional": lambda: [
        A.Sharpen(alpha=(0.8, 1.0), lightness=(0.75, 2.0), p=1.0),
        A.Emboss(alpha=(0.8, 1.0), strength=(0.5, 1.5), p=1.0),
    ],
    "geometric": lambda: [
        A.Affine(rotate=(15, 45), shear=(15, 25), p=1.0),
        A.Perspective(scale=(0.1, 0.2), p=1.0),
        A.PiecewiseAffine(scale=(0.05, 0.1), p=1.0),
    ],
    "segmentation": lambda: [A.Superpixels(p_replace=(0.5, 1.0), n_segments=(16, 128), p=1.0)],
    "weather": lambda: [
        A.RandomFog(fog_coef_range=(0.5, 1.0), p=1.0),
        A.RandomRain(p=1.0),
        A.RandomSnow(method="bleach", p=1.0),
    ],
}
"""Each family's operations (one is drawn per image)."""

POLICY_FAMILIES = {
    "none": set(),
    "digits": {"geometric"},
    "imagenet": {"geometric", "color"},
    "maps": {"geometric", "color"},
}
"""The families each training policy (``data.augment``) already uses: never valid for validation with it."""


def check_families(families: Sequence[str], policy: str) -> list[str]:
    """``families`` validated against :data:`FAMILIES` and the training policy.

    Raises:
        ValueError: an unknown family, or one the training augmentation already uses (the valid ones are named).
    """
    used = POLICY_FAMILIES.get(policy, set(FAMILIES))
    valid = [f for f in FAMILIES if f not in used]
    bad = [f for f in families if f not in FAMILIES or f in used]
    if bad or not families:
        raise ValueError(
            f"data.crafted_families={list(families)}: {bad or 'empty'} not usable with data.augment={policy!r} "
            f"(unknown, or a family training already uses); choose among {valid}"
        )
    return list(families)


class CraftedShiftDataset(Dataset):
    """A domain's images, each rendered once per family (frozen, seeded), then the evaluation pipeline.

    Item ``k`` is image ``k // len(families)`` under family ``k % len(families)``.
    """

    def __init__(self, dataset: Dataset, families: Sequence[str], evaluation, seed: int, domain: str) -> None:
        self.dataset, self.families, self.evaluation = dataset, list(families), evaluation
        self.seed, self.domain = seed, domain
        self.shifts = {f: A.OneOf(FAMILIES[f](), p=1.0) for f in self.families}

    def __len__(self) -> int:
        return len(self.dataset) * len(self.families)

    def __getitem__(self, k: int):
        i, f = divmod(k, len(self.families))
        image, label = self.dataset[i]
        family = self.families[f]
        shift = self.shifts[family]
        s = seed_hash(self.seed, self.domain, family, i)
        shift.set_random_state(np.random.default_rng(s), random.Random(s))
        return self.evaluation(image=shift(image=np.ascontiguousarray(image))["image"])["image"], label
