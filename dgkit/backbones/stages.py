"""A backbone seen as ``stem -> stage_1 ... stage_n -> pool``, for methods that act between stages (ITTA's
MixStyle and test-time mapping).

Each backbone declares its split by implementing :meth:`~dgkit.backbones.base.Backbone.stages` in its own file
(:class:`~dgkit.backbones.SmallCNN`: each conv-ReLU-norm block is a stage; :class:`~dgkit.backbones.TimmBackbone`:
timm ResNets and ViTs). :func:`backbone_stages` asks for it and turns "not supported" into a ``ValueError`` that
names the method asking and the backbones that are supported."""

from __future__ import annotations

from torch import nn

from dgkit.backbones.base import STAGED_BACKBONES, Backbone, Stages, StagesNotSupported

SUPPORTED = STAGED_BACKBONES

__all__ = ["SUPPORTED", "Stages", "StagesNotSupported", "backbone_stages"]


def backbone_stages(backbone: nn.Module, what: str = "this method") -> Stages:
    """``backbone.stages()``; raise ``ValueError`` naming ``what`` and the supported backbones where it has none.

    Args:
        backbone: the backbone to split.
        what: the config choice that needs the split (``method=itta``), for the error message.
    """
    if isinstance(backbone, Backbone):
        try:
            return backbone.stages()
        except StagesNotSupported as e:
            name = e.name
    else:  # a module outside dgkit's Backbone interface declares no capability (the interface is the declaration)
        name = type(backbone).__name__
    raise ValueError(f"{what} needs a backbone split into stages: {SUPPORTED}; got {name}")
