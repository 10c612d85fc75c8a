"""A backbone seen as ``stem -> stage_1 ... stage_n -> pool``, for methods that act between stages (ITTA's
MixStyle and test-time mapping). Supported: :class:`~dgkit.backbones.SmallCNN` (each conv-ReLU-norm block is a
stage), timm ResNets (``layer1``..``layer4`` after the ``conv1/bn1/act1/maxpool`` stem) and timm ViTs (each
transformer block is a stage; the final norm joins the last one). Anything else is refused by
:func:`backbone_stages` with the list of what is supported."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dgkit.backbones.small_cnn import SmallCNN
from dgkit.backbones.timm_backbone import TimmBackbone

SUPPORTED = (
    "small_cnn / small_cnn_lite (dgkit.backbones.SmallCNN), timm ResNets (resnet18, resnet50, ...) and timm ViTs "
    "(vit_*, test_vit)"
)


class _ViTStem(nn.Module):
    """A timm VisionTransformer's token embedding: patches, position embedding (+ class token), pre-norm."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, N, C)``."""
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))


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
    if isinstance(backbone, TimmBackbone) and all(hasattr(model, a) for a in ("patch_embed", "_pos_embed", "blocks")):
        blocks = list(model.blocks)
        return Stages(_ViTStem(model), [*blocks[:-1], nn.Sequential(blocks[-1], model.norm)], backbone)
    name = getattr(backbone, "model", backbone).__class__.__name__
    raise ValueError(f"{what} needs a backbone split into stages: {SUPPORTED}; got {name}")
