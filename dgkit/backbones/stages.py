"""A backbone seen as ``stem -> stage_1 ... stage_n -> pool``, for methods that act between stages (ITTA's
MixStyle and test-time mapping). Supported: :class:`~dgkit.backbones.SmallCNN` (each conv-ReLU-norm block is a
stage) and timm ResNets (``layer1``..``layer4`` after the ``conv1/bn1/act1/maxpool`` stem). Anything else is
refused by :func:`backbone_stages` with the list of what is supported."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dgkit.backbones.small_cnn import SmallCNN
from dgkit.backbones.timm_backbone import TimmBackbone

SUPPORTED = "small_cnn / small_cnn_lite (dgkit.backbones.SmallCNN) and timm ResNets (resnet18, resnet50, ...)"


@dataclass
class Stages:
    """``stem`` (a module, maybe identity), ``stages`` (a list of modules) and ``pool`` (the backbone's own)."""

    stem: nn.Module
    stages: list[nn.Module]
    backbone: nn.Module

    def forward(self, x: torch.Tensor, after_stage=None) -> torch.Tensor:
        """Pooled features ``(B, D)``; ``after_stage(i, h)`` (if given) transforms the output of stage ``i``."""
        h = self.stem(x)
        for i, stage in enumerate(self.stages):
            h = stage(h)
            if after_stage is not None:
                h = after_stage(i, h)
        return self.backbone.pool(h)


def backbone_stages(backbone: nn.Module, what: str = "this method") -> Stages:
    """Split ``backbone`` into stages; raise ``ValueError`` naming the supported backbones otherwise."""
    if isinstance(backbone, SmallCNN):
        layers = list(backbone.features)
        blocks = [nn.Sequential(*layers[i : i + 3]) for i in range(0, len(layers), 3)]  # conv, ReLU, norm
        return Stages(nn.Identity(), blocks, backbone)
    model = getattr(backbone, "model", None)
    if isinstance(backbone, TimmBackbone) and all(hasattr(model, f"layer{i}") for i in range(1, 5)):
        stem = nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool)
        return Stages(stem, [getattr(model, f"layer{i}") for i in range(1, 5)], backbone)
    name = getattr(backbone, "model", backbone).__class__.__name__
    raise ValueError(f"{what} needs a backbone split into stages: {SUPPORTED}; got {name}")
