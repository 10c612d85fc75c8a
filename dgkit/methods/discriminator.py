"""The domain discriminator of domain-adversarial methods: DomainBed's ``networks.MLP`` (Gulrajani & Lopez-Paz,
ICLR 2021), used by DANN (Ganin et al., JMLR 2016) to predict which source domain a feature came from.

No BatchNorm, so batch statistics cannot leak a sample's domain (every domain shares one forward anyway).
"""

from __future__ import annotations

import torch
from torch import nn


class DomainDiscriminator(nn.Sequential):
    """``Linear(d, w) → Dropout → ReLU``, then ``(depth - 2) ×`` ``[Linear(w, w) → Dropout → ReLU]``, then
    ``Linear(w, num_domains)``.

    Args:
        in_features: feature width ``d``.
        num_domains: number of outputs (one logit per source domain).
        width: hidden width ``w``.
        depth: number of linear layers (at least 2).
        dropout: dropout probability after each hidden linear layer.
    """

    def __init__(self, in_features: int, num_domains: int, width: int = 256, depth: int = 3, dropout: float = 0.0):
        if depth < 2:
            raise ValueError(f"mlp_depth={depth}: the discriminator needs at least 2 linear layers")
        if width < 1:
            raise ValueError(f"mlp_width={width}: must be at least 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"mlp_dropout={dropout}: must be in [0, 1)")
        layers: list[nn.Module] = []
        for i in range(depth - 1):
            layers += [nn.Linear(in_features if i == 0 else width, width), nn.Dropout(dropout), nn.ReLU()]
        layers.append(nn.Linear(width, num_domains))
        super().__init__(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Domain logits ``(B, num_domains)`` from features ``(B, d)``."""
        return super().forward(z)
