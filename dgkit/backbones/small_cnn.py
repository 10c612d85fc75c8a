"""A small CNN for the digit benchmarks, shaped like DomainBed's ``MNIST_CNN``.

Four 3x3 convolutions (64-128-128-128 channels, the second with stride 2), each followed by ReLU and a
normalisation layer, then global average pooling to a 128-d feature. Hand-written because timm has no
model this small that works on 28-32 px digits; DomainBed's numbers on RotatedMNIST use this shape.

Each conv-ReLU-norm block is a stage: ``forward_intermediates`` gives the four block outputs (timm's surface),
``stages()`` the four blocks (no stem) for methods that act between them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from timm.models._features import feature_take_indices  # timm's own `indices` semantics (int, list, negative)
from torch import nn

from dgkit.backbones.base import Backbone, DataConfig, Intermediates, Stages
from dgkit.backbones.weights import load_weights

_NORMS = ("group", "batch")
_LAYERS_PER_STAGE = 3  # conv, ReLU, norm


class SmallCNN(Backbone):
    """DomainBed-style MNIST CNN.

    Args:
        in_chans: input channels (RGB digits: 3).
        widths: output channels of the four convolutions.
        strides: stride of each convolution (DomainBed: only the second downsamples).
        norm: ``group`` (GroupNorm with 8 groups, DomainBed's choice) or ``batch`` (BatchNorm, for
            test-time adaptation methods that need batch statistics).
        img_size: the side of the square input the data pipeline resizes to.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        weights: path to a local ``.pth``/``.bin``/``.safetensors`` state dict of this architecture (e.g. the
            ``backbone.safetensors`` a self-supervised run exports).
    """

    def __init__(
        self,
        in_chans: int = 3,
        widths: tuple[int, int, int, int] | list[int] = (64, 128, 128, 128),
        strides: tuple[int, int, int, int] | list[int] = (1, 2, 1, 1),
        norm: str = "group",
        img_size: int = 32,
        mean: tuple[float, float, float] | list[float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] | list[float] = (0.5, 0.5, 0.5),
        weights: str | None = None,
    ) -> None:
        super().__init__()
        if norm not in _NORMS:
            raise ValueError(f"SmallCNN norm={norm!r} is not supported; choose one of {list(_NORMS)}")
        if len(widths) != 4 or len(strides) != 4:
            raise ValueError(f"SmallCNN needs 4 widths and 4 strides, got {list(widths)} and {list(strides)}")
        layers: list[nn.Module] = []
        c_in = in_chans
        for c_out, stride in zip(widths, strides):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.ReLU(inplace=True)]
            layers.append(nn.GroupNorm(8, c_out) if norm == "group" else nn.BatchNorm2d(c_out))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.num_features = int(widths[-1])
        self.feature_info = [  # timm's declaration of the intermediates: one per block, after its norm layer
            {
                "num_chs": int(c),
                "reduction": math.prod(int(s) for s in list(strides)[: i + 1]),
                "module": f"features.{_LAYERS_PER_STAGE * i + 2}",
            }
            for i, c in enumerate(widths)
        ]
        self.data_config = DataConfig(input_size=(img_size, img_size), mean=tuple(mean), std=tuple(std))
        if weights:
            load_weights(self, weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map ``(B, C, H / prod(strides), W / prod(strides))``."""
        return self.features(x)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """Global average pooling ``(B, C, H, W) -> (B, C)``."""
        return features.mean(dim=(2, 3))

    def _blocks(self) -> list[nn.Sequential]:
        """The four conv-ReLU-norm blocks (views of ``self.features``: same parameters, same state-dict keys)."""
        layers = list(self.features)
        return [nn.Sequential(*layers[i : i + _LAYERS_PER_STAGE]) for i in range(0, len(layers), _LAYERS_PER_STAGE)]

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Intermediates:
        """timm 1.0's surface (see :meth:`Backbone.forward_intermediates`): the outputs of the four blocks.

        ``norm`` changes nothing (every block already ends in its normalisation layer; there is no final norm,
        as in timm's ResNets); only ``output_fmt="NCHW"`` exists.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"SmallCNN output_fmt={output_fmt!r} is not supported; choose one of ['NCHW']")
        blocks = self._blocks()
        take_indices, max_index = feature_take_indices(len(blocks), indices)
        intermediates = []
        for i, block in enumerate(blocks[: max_index + 1] if stop_early else blocks):
            x = block(x)  # (B, C_i, H / prod(strides[:i + 1]), W / ...)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def stages(self) -> Stages:
        """No stem, the four conv-ReLU-norm blocks, global average pooling."""
        return Stages(nn.Identity(), self._blocks(), self.pool)
