"""DoRA-SAM: weight-decomposed low-rank adaptation (DoRA, Liu et al., ICML 2024, arXiv 2402.09353) on the q and v
slices of every fused ``qkv`` of SAM's image encoder, as MapSAM does (Xia et al., arXiv 2411.06971).

Each adapted slice (weight ``W`` ``(out, in)``) becomes ``W' = m ⊙ V / ‖V‖`` with ``V = W + s B A`` (``A`` ``(r, in)``
Kaiming-uniform, ``B`` ``(out, r)`` zero, ``s = alpha / r``), and ``m`` initialised to ``‖W‖`` so the output is
unchanged at init. Two variants, chosen by ``magnitude_axis``:

- ``out`` (standard DoRA, peft's): one magnitude per output feature, the norm taken over the input dimension
  (each row of ``W``) and *detached* in backprop (DoRA §4.3);
- ``in`` (MapSAM's ``sam_dora_image_encoder.py``): one magnitude per input feature, the norm taken over the output
  dimension (each column), *not* detached. MapSAM has no ``alpha`` scale (``alpha = rank`` gives ``s = 1``).

The fused ``qkv`` is split into ``q``, ``k``, ``v`` layers (:class:`~dgkit.adapters.qkv.SplitQKV`), which computes
``[W'_q; W_k; W'_v]`` exactly as MapSAM's rebuilt fused weight; ``merge`` folds ``W'`` back and re-fuses ``qkv``.
Hand-written because peft's DoRA spans all rows of a fused ``qkv`` and has no per-input magnitude.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dgkit.adapters.core import AdapterLinear
from dgkit.adapters.spec import Adapter

MAGNITUDE_AXES = ("out", "in")


class DoRALinear(AdapterLinear):
    """Standard DoRA on one linear layer: per-output magnitude ``m`` ``(out,)``, row norm detached.

    Args:
        base: the frozen pretrained layer.
        rank: the rank ``r`` of ``B A``.
        alpha: the scale numerator (``s = alpha / rank``).
    """

    norm_dim: ClassVar[int] = 1  # the norm runs over the input dimension: one value per row (output feature)
    detach_norm: ClassVar[bool] = True

    def __init__(self, base: nn.Linear, rank: int = 4, alpha: float = 4.0) -> None:
        super().__init__(base)
        w = base.weight
        a = torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A = nn.Parameter(a)  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))  # (out, r)
        self.scale = float(alpha) / rank
        self.magnitude = nn.Parameter(w.detach().norm(dim=self.norm_dim).clone())  # (out,) or (in,)

    def adapted_weight(self) -> torch.Tensor:
        """``W' = m ⊙ V / ‖V‖`` with ``V = W + s B A`` ``(out, in)``."""
        v = self.base.weight + self.scale * (self.lora_B @ self.lora_A)  # (out, in)
        norm = v.norm(dim=self.norm_dim, keepdim=True)  # (out, 1) or (1, in)
        if self.detach_norm:
            norm = norm.detach()
        return self.magnitude.unsqueeze(self.norm_dim) * v / norm

    def delta_weight(self) -> torch.Tensor:
        """``W' - W`` ``(out, in)``."""
        return self.adapted_weight() - self.base.weight

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``x (W' - W)ᵀ`` ``(..., out)``."""
        return F.linear(x, self.delta_weight())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x W'ᵀ + b`` (one matrix product: DoRA rescales the whole weight, it is not an additive branch)."""
        return F.linear(x, self.adapted_weight(), self.base.bias)


class InputMagnitudeDoRALinear(DoRALinear):
    """MapSAM's DoRA: per-input magnitude ``m`` ``(in,)``, column norm over the output dimension, not detached."""

    norm_dim: ClassVar[int] = 0
    detach_norm: ClassVar[bool] = False


_VARIANTS: dict[str, type[DoRALinear]] = {"out": DoRALinear, "in": InputMagnitudeDoRALinear}


class DoRASAM(Adapter):
    """DoRA on the q and v slices of every block's fused ``qkv`` (rank 4); the rest of the encoder is frozen.

    Args:
        rank: the rank of ``B A`` (MapSAM: 4).
        alpha: the scale numerator, ``s = alpha / rank`` (MapSAM: no scale, i.e. ``alpha = rank``).
        magnitude_axis: ``out`` (standard DoRA, detached norm) or ``in`` (MapSAM's per-input magnitude, norm not
            detached).
        target, start_block, split_qkv, qkv_slices, train_bias, trainable: as in
            :class:`~dgkit.adapters.spec.Adapter` (here: ``attn.qkv`` split, slices ``[q, v]``, every block;
            ``trainable`` names the backbone parts that train besides DoRA, e.g. SAM's prompt encoder and mask
            decoder for ``method=mapsam``).
    """

    name = "dora_sam"

    def __init__(
        self,
        rank: int = 4,
        alpha: float = 4.0,
        magnitude_axis: str = "out",
        target: str = r"attn\.qkv",
        start_block: int | None = 0,
        split_qkv: bool = True,
        qkv_slices: Sequence[str] = ("q", "v"),
        train_bias: bool = False,
        trainable: Sequence[str] = (),
    ) -> None:
        super().__init__(target, rank, start_block, split_qkv, qkv_slices, train_bias, trainable)
        if magnitude_axis not in _VARIANTS:
            raise ValueError(f"adapter.magnitude_axis={magnitude_axis!r}; valid: {list(MAGNITUDE_AXES)}")
        if alpha <= 0:
            raise ValueError(f"adapter.alpha={alpha}: must be > 0")
        self.alpha = float(alpha)
        self.magnitude_axis = magnitude_axis

    def wrap(self, name: str, layer: nn.Linear) -> nn.Module:
        """The DoRA variant of ``magnitude_axis`` around ``layer``."""
        return _VARIANTS[self.magnitude_axis](layer, self.rank, self.alpha)
