"""The backbone interface every method relies on (methods never check a backbone's type)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DataConfig:
    """Preprocessing a backbone expects: input size and normalisation statistics.

    Albumentations pipelines are built from it (never baked into a dataset), so a ViT that wants
    mean/std 0.5 gets them and a 32 px CNN is not resized to 224.
    """

    input_size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    extra: dict = field(default_factory=dict)


class Backbone(nn.Module):
    """Base class: subclasses implement ``forward_features`` and ``pool`` and set ``num_features``."""

    num_features: int
    data_config: DataConfig

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled features (``(B, C, H, W)`` for CNNs, ``(B, N, C)`` tokens for ViTs)."""
        raise NotImplementedError

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """Reduce ``forward_features`` output to ``(B, num_features)``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, num_features)``."""
        return self.pool(self.forward_features(x))
