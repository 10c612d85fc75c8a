"""The backbone interface every method relies on (methods never check a backbone's type).

A backbone declares what it gives by implementing the interface, never by attributes a caller probes for:

* ``forward_features(x)`` (unpooled), ``pool(features)``, ``forward(x)`` (pooled ``(B, D)``), ``num_features``,
  ``data_config``;
* ``forward_intermediates(x, indices, norm, stop_early, output_fmt, intermediates_only)``: timm 1.0's surface
  (``timm/models/resnet.py::ResNet.forward_intermediates``), with ``feature_info`` (timm's list of
  ``{"num_chs", "reduction", "module"}``, one entry per intermediate) saying what it gives;
* ``stages()``: the backbone as ``stem -> stage_1 ... stage_n -> pool`` (:class:`Stages`), for methods that
  transform the features *between* stages (ITTA's MixStyle and test-time mapping), which
  ``forward_intermediates`` cannot do. The base class raises :class:`StagesNotSupported`;
* ``prompt_decoder`` (with ``decoder_prefixes``): a promptable mask decoder built in (SAM's), ``False`` by default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Kept in one place: the message of every "no stages" error lists them.
STAGED_BACKBONES = (
    "small_cnn / small_cnn_lite (dgkit.backbones.SmallCNN), timm ResNets (resnet18, resnet50, ...) and timm ViTs "
    "(vit_*, test_vit)"
)

Intermediates = list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]


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


@dataclass
class Stages:
    """A backbone run stage by stage: ``pool(stages[-1](... stages[0](stem(x))))`` equals ``backbone(x)``.

    Attributes:
        stem: the layers before the first stage (maybe ``nn.Identity``).
        stages: the stage modules, in order; they share parameters with the backbone.
        pool: the backbone's own pooling, ``(unpooled features) -> (B, num_features)``.
    """

    stem: nn.Module
    stages: list[nn.Module]
    pool: Callable[[torch.Tensor], torch.Tensor]

    def forward(
        self, x: torch.Tensor, after_stage: Callable[[int, torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Pooled features ``(B, D)``; ``after_stage(i, h)`` (if given) transforms the output of stage ``i``."""
        h = self.stem(x)
        for i, stage in enumerate(self.stages):
            h = stage(h)
            if after_stage is not None:
                h = after_stage(i, h)
        return self.pool(h)


class StagesNotSupported(NotImplementedError):
    """Raised by :meth:`Backbone.stages` on a backbone that cannot be run stage by stage.

    Args:
        name: the backbone (for a timm backbone: the timm model and its class).
    """

    def __init__(self, name: str) -> None:
        super().__init__(f"{name} cannot be split into stages; backbones that can: {STAGED_BACKBONES}")
        self.name = name


class Backbone(nn.Module):
    """Base class: subclasses implement ``forward_features`` and ``pool`` and set ``num_features``.

    ``forward_intermediates`` (with ``feature_info``) and ``stages`` are optional capabilities: a subclass that
    gives them overrides the methods here, which raise a clear error naming the backbone.
    """

    num_features: int
    data_config: DataConfig
    feature_info: list[dict[str, Any]]

    @property
    def prompt_decoder(self) -> bool:
        """Capability: a promptable mask decoder is built in, segment-anything's ``PromptEncoder`` and ``MaskDecoder``
        as the ``prompt_encoder`` and ``mask_decoder`` attributes beside the image encoder (``method=mapsam`` needs
        it). ``False`` here; :class:`~dgkit.backbones.sam.SAMBackbone` built with ``prompt_decoder=true`` says
        ``True``."""
        return False

    @property
    def decoder_prefixes(self) -> tuple[str, ...]:
        """Qualified-name prefixes of the built-in decoder's modules (not the feature extractor): adapters never
        target them, and the method that uses the decoder decides whether it trains. Empty here."""
        return ()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled features (``(B, C, H, W)`` for CNNs, ``(B, N, C)`` tokens for ViTs)."""
        raise NotImplementedError

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """Reduce ``forward_features`` output to ``(B, num_features)``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, num_features)``."""
        return self.pool(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Intermediates:
        """timm 1.0's ``forward_intermediates``: the final features and the intermediate ones.

        Args:
            x: input images ``(B, 3, H, W)``.
            indices: which intermediates (positions in ``feature_info``): ``n`` = the last ``n``, a sequence = those
                (negative ones count from the end), ``None`` = all.
            norm: apply the final norm layer to the intermediates (where the backbone has one).
            stop_early: stop after the last requested intermediate (the "final" features are then its output).
            output_fmt: layout of the intermediates (``NCHW``; timm ViTs also give ``NLC``).
            intermediates_only: return only the list of intermediates.

        Returns:
            ``(final_features, intermediates)``, ``final_features`` being what ``forward_features`` returns, or
            only ``intermediates`` when ``intermediates_only``.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement forward_intermediates")

    def stages(self) -> Stages:
        """This backbone as ``stem -> stages -> pool`` (see :class:`Stages`).

        Raises:
            StagesNotSupported: the backbone cannot be run stage by stage (the default).
        """
        raise StagesNotSupported(type(self).__name__)
