"""Albumentations pipelines built from a backbone's ``DataConfig`` and a per-dataset policy.

Policies (``data.augment``):
    ``none``: resize + normalise (DomainBed's MNIST setting).
    ``digits``: random shifts of up to 4 px (pad by edge replication, random crop), never flips or rotations
        (a rotated 6 is a 9, and rotation is the domain shift of rotated_digits).
    ``imagenet``: DomainBed's image augmentation: random resized crop (scale 0.7-1), horizontal flip,
        colour jitter 0.3, 10 % grayscale.
    ``maps``: for map tiles (segmentation; no up or left on a map sheet): random resized crop (scale 0.5-1),
        horizontal and vertical flips, 90-degree rotations, colour jitter 0.2. Masks passed with ``mask=`` get
        the same geometric transforms (nearest-neighbour resampling); colour changes leave them alone.
"""

from __future__ import annotations

from collections.abc import Callable

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

from dgkit.backbones.base import DataConfig

# OpenCV's own thread pool costs more than it saves on small images and fights PyTorch for the cores.
cv2.setNumThreads(1)

_INTERPOLATION = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}


def _resize(cfg: DataConfig) -> A.BasicTransform:
    h, w = cfg.input_size
    return A.Resize(h, w, interpolation=_INTERPOLATION.get(cfg.interpolation, cv2.INTER_LINEAR))


def _digits(cfg: DataConfig) -> list[A.BasicTransform]:
    h, w = cfg.input_size
    return [
        _resize(cfg),
        A.PadIfNeeded(h + 8, w + 8, border_mode=cv2.BORDER_REPLICATE),
        A.RandomCrop(h, w),
    ]


def _imagenet(cfg: DataConfig) -> list[A.BasicTransform]:
    return [
        A.RandomResizedCrop(size=cfg.input_size, scale=(0.7, 1.0)),
        A.HorizontalFlip(p=0.5),
        A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.3, p=1.0),
        A.ToGray(p=0.1),
    ]


def _maps(cfg: DataConfig) -> list[A.BasicTransform]:
    return [
        A.RandomResizedCrop(size=cfg.input_size, scale=(0.5, 1.0)),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=0.5),
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05, p=0.8),
    ]


POLICIES: dict[str, Callable[[DataConfig], list[A.BasicTransform]]] = {
    "none": lambda cfg: [_resize(cfg)],
    "digits": _digits,
    "imagenet": _imagenet,
    "maps": _maps,
}


def build_transform(cfg: DataConfig, policy: str = "none", train: bool = False) -> A.Compose:
    """The pipeline for one split: augmentation (training only), then normalisation and a CHW float tensor."""
    if policy not in POLICIES:
        raise ValueError(f"data.augment={policy!r} is not a known policy; choose one of {sorted(POLICIES)}")
    head = POLICIES[policy](cfg) if train else [_resize(cfg)]
    return A.Compose([*head, A.Normalize(mean=cfg.mean, std=cfg.std, max_pixel_value=255.0), ToTensorV2()])
