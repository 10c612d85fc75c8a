"""PEGO: Parameter-Efficient Group with Orthogonal regularisation (Hu et al., ECCV 2024, arXiv 2407.15085).

Each target (by default the q and v slices of every block's fused ``qkv``) gets a group of ``K`` LoRA pairs,
summed, with no ``alpha/r`` scale: ``ΔW = Σ_i B_i A_i`` (``A_i`` Kaiming-uniform, ``B_i = 0``). The loss adds

    λ · [ Σ_i ‖W ΔW_iᵀ‖₁ + Σ_{i<j} ‖ΔW_i ΔW_jᵀ‖₁ ]      (entry-wise L1, λ = 1e-3, W the frozen pretrained slice)

through :func:`dgkit.adapters.regularizers`: the first term keeps each update orthogonal to the pretrained
weight's rows, the second makes the group members mutually orthogonal.

Hand-written: peft can hold several LoRA adapters on one layer, but its update spans all rows of a fused qkv
(k gets adapted too) and it has no orthogonality loss; a small module holds the group and the penalty.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dgkit.adapters.core import AdapterLinear
from dgkit.adapters.spec import Adapter


def orthogonality_penalty(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """``Σ_i ‖W ΔW_iᵀ‖₁ + Σ_{i<j} ‖ΔW_i ΔW_jᵀ‖₁`` with ``ΔW_i = B_i A_i``, computed in low-rank order.

    Args:
        weight: the frozen pretrained weight ``W`` ``(out, in)``.
        lora_a: the group's ``A_i`` stacked ``(K, r, in)``.
        lora_b: the group's ``B_i`` stacked ``(K, out, r)``.
    """
    wa = torch.einsum("oi,kri->kor", weight, lora_a)  # W A_iᵀ: (K, out, r)
    preserve = (wa @ lora_b.transpose(1, 2)).abs().sum()  # W A_iᵀ B_iᵀ = W ΔW_iᵀ: (K, out, out)
    k = lora_a.shape[0]
    diversify = weight.new_zeros(())
    for i in range(k):
        for j in range(i + 1, k):
            core = lora_a[i] @ lora_a[j].T  # A_i A_jᵀ: (r, r)
            diversify = diversify + (lora_b[i] @ core @ lora_b[j].T).abs().sum()  # ΔW_i ΔW_jᵀ: (out, out)
    return preserve + diversify


class LoRAGroupLinear(AdapterLinear):
    """A linear layer plus ``K`` summed LoRA pairs and PEGO's orthogonality penalty.

    Args:
        base: the frozen pretrained layer.
        rank: each pair's rank ``r``.
        num: the group size ``K``.
        weight: the penalty weight ``λ``.
    """

    def __init__(self, base: nn.Linear, rank: int = 4, num: int = 2, weight: float = 1e-3) -> None:
        super().__init__(base)
        a = torch.empty(num, rank, base.in_features, device=base.weight.device, dtype=base.weight.dtype)
        for i in range(num):
            nn.init.kaiming_uniform_(a[i], a=math.sqrt(5))
        self.lora_A = nn.Parameter(a)  # (K, r, in)
        self.lora_B = nn.Parameter(torch.zeros(num, base.out_features, rank, dtype=a.dtype, device=a.device))
        self.penalty_weight = float(weight)

    def delta_weight(self) -> torch.Tensor:
        """``Σ_i B_i A_i`` ``(out, in)``."""
        return torch.einsum("kor,kri->oi", self.lora_B, self.lora_A)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``Σ_i (x A_iᵀ) B_iᵀ`` ``(..., out)``: the K pairs as one rank-``K r`` product."""
        k, r, d_in = self.lora_A.shape
        a = self.lora_A.reshape(k * r, d_in)  # (K r, in)
        b = self.lora_B.permute(1, 0, 2).reshape(self.out_features, k * r)  # (out, K r)
        return F.linear(F.linear(x, a), b)

    def regularizer(self) -> torch.Tensor | None:
        """``λ`` times :func:`orthogonality_penalty` against the frozen base weight."""
        if self.penalty_weight == 0:
            return None
        return self.penalty_weight * orthogonality_penalty(self.base.weight.detach(), self.lora_A, self.lora_B)


class PEGO(Adapter):
    """PEGO: a group of ``num`` rank-``rank`` LoRA pairs on the q and v slices of every fused ``qkv``.

    Args:
        rank: each pair's rank (official: 4).
        num: the group size ``K`` (official: 2 for PACS, 4 for VLCS, OfficeHome, TerraIncognita, DomainNet).
        weight: the orthogonality penalty weight ``λ`` (official: 1e-3, calibrated for width 768).
        target, start_block, split_qkv, qkv_slices, train_bias, trainable: as in
            :class:`~dgkit.adapters.spec.Adapter` (PEGO: ``attn.qkv`` split, slices ``[q, v]``, every block).
    """

    name = "pego"

    def __init__(
        self,
        rank: int = 4,
        num: int = 2,
        weight: float = 1e-3,
        target: str = r"attn\.qkv",
        start_block: int | None = 0,
        split_qkv: bool = True,
        qkv_slices: Sequence[str] = ("q", "v"),
        train_bias: bool = False,
        trainable: Sequence[str] = (),
    ) -> None:
        super().__init__(target, rank, start_block, split_qkv, qkv_slices, train_bias, trainable)
        if num < 1:
            raise ValueError(f"adapter.num={num}: the group needs at least 1 LoRA pair")
        if weight < 0:
            raise ValueError(f"adapter.weight={weight}: must be >= 0")
        self.num = int(num)
        self.weight = float(weight)

    def wrap(self, name: str, layer: nn.Linear) -> nn.Module:
        """The LoRA group around ``layer``."""
        return LoRAGroupLinear(layer, self.rank, self.num, self.weight)
