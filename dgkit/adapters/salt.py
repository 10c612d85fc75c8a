"""SALT: Singular value Adaptation with Low-rank Transformation (BMVC 2025, arXiv 2503.16055).

Each target linear ``W = U diag(σ) Vᵀ`` (thin fp32 SVD, after the pretrained weights are loaded) is split at
``r_top = max(1, ⌊top_ratio · n⌋)`` (``n = min(out, in)``):

- the ``r_top`` largest singular values get a trainable scale and shift, ``σ′ = ReLU(a ⊙ σ_top + b)``
  (``a = 1``, ``b = 0`` at init);
- the other ``n − r_top`` directions get LoRA *inside the residual singular basis*:
  ``ΔW_rest = U_rest X Y V_restᵀ`` with ``X`` Kaiming-uniform and ``Y = 0`` (the SAM2 release's
  output-preserving init).

So ``W′ = W + U_top diag(σ′ − σ_top) V_topᵀ + U_rest X Y V_restᵀ``, evaluated in low-rank order, never as a
dense matrix. An optional penalty ``reg_weight · (‖σ′ − σ_top‖₂ + ‖X Y‖_F)`` goes through
:func:`dgkit.adapters.regularizers` (0 in the official config, so off by default).

Hand-written: peft has no SALT. Differences from the official code, on purpose:

- the ReLU acts on the top singular values only; the official code applies it element-wise to the whole
  ``Σ′`` matrix, off-diagonal LoRA entries included, which makes the update non-linear in ``X Y``;
- the singular bases are persistent buffers (saved in the checkpoint), not attributes recomputed at the
  first forward, so a reloaded model does not depend on re-running an SVD (whose signs are not unique).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dgkit.adapters.core import AdapterLinear
from dgkit.adapters.qkv import SLICES
from dgkit.adapters.spec import DEFAULT_TARGET, Adapter


def top_rank(n: int, top_ratio: float) -> int:
    """``r_top = max(1, ⌊top_ratio · n⌋)``: how many of ``n`` singular values get a scale and shift."""
    return max(1, int(top_ratio * n))


class SALTLinear(AdapterLinear):
    """A linear layer with SALT's scaled/shifted top singular values and LoRA in the residual singular basis.

    Args:
        base: the frozen pretrained layer (its weight is left as it is).
        rank: ``r_lora``, the rank of ``X Y`` (at most ``n − r_top``).
        top_ratio: the share of singular values that get a scale and shift.
        reg_weight: the penalty weight (0: no penalty).
    """

    def __init__(self, base: nn.Linear, rank: int = 8, top_ratio: float = 0.1, reg_weight: float = 0.0) -> None:
        super().__init__(base)
        w = base.weight.detach()
        u, sigma, vh = torch.linalg.svd(w.float(), full_matrices=False)  # σ descending
        n = sigma.numel()
        r_top = top_rank(n, top_ratio)
        if rank > n - r_top:
            raise ValueError(f"SALT rank {rank} exceeds the {n - r_top} residual singular directions")
        dtype = w.dtype
        self.register_buffer("u_top", u[:, :r_top].to(dtype))
        self.register_buffer("sigma_top", sigma[:r_top].to(dtype))
        self.register_buffer("vh_top", vh[:r_top].to(dtype))
        self.register_buffer("u_rest", u[:, r_top:].to(dtype))
        self.register_buffer("vh_rest", vh[r_top:].to(dtype))
        self.sv_scale = nn.Parameter(torch.ones(r_top, dtype=dtype, device=w.device))
        self.sv_shift = nn.Parameter(torch.zeros(r_top, dtype=dtype, device=w.device))
        x = torch.empty(n - r_top, rank, dtype=dtype, device=w.device)
        nn.init.kaiming_uniform_(x, a=math.sqrt(5))
        self.lora_B = nn.Parameter(x)  # X: (n - r_top, r), on the output side
        self.lora_A = nn.Parameter(torch.zeros(rank, n - r_top, dtype=dtype, device=w.device))  # Y: (r, n - r_top)
        self.reg_weight = float(reg_weight)

    def sigma_delta(self) -> torch.Tensor:
        """``ReLU(a ⊙ σ_top + b) − σ_top`` ``(r_top,)``."""
        return F.relu(self.sv_scale * self.sigma_top + self.sv_shift) - self.sigma_top

    def _rest_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.u_rest @ self.lora_B, self.lora_A @ self.vh_rest  # (out, r), (r, in)

    def delta_weight(self) -> torch.Tensor:
        """``U_top diag(σ′ − σ_top) V_topᵀ + U_rest X Y V_restᵀ`` ``(out, in)``."""
        left, right = self._rest_factors()
        return (self.u_top * self.sigma_delta()) @ self.vh_top + left @ right

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The update's output, through the ``r_top`` and ``r_lora`` bottlenecks."""
        left, right = self._rest_factors()
        top = F.linear(F.linear(x, self.vh_top) * self.sigma_delta(), self.u_top)
        return top + F.linear(F.linear(x, right), left)

    def regularizer(self) -> torch.Tensor | None:
        """``reg_weight · (‖σ′ − σ_top‖₂ + ‖X Y‖_F)``, or ``None`` when the weight is 0."""
        if self.reg_weight == 0:
            return None
        return self.reg_weight * (self.sigma_delta().norm() + (self.lora_B @ self.lora_A).norm())


class SALT(Adapter):
    """SALT on the attention and MLP linears (the official targets: qkv, proj, lin1/lin2 of SAM's encoder).

    Args:
        rank: ``r_lora`` of the residual-basis LoRA (official SAM2 config: 256 at SAM's widths; at most
            ``n − r_top`` of every adapted layer).
        top_ratio: share of singular values with a trainable scale and shift (official: 0.1).
        reg_weight: weight of ``‖σ′ − σ_top‖ + ‖X Y‖_F`` (official: 0).
        target, start_block, split_qkv, qkv_slices, train_bias, trainable: as in
            :class:`~dgkit.adapters.spec.Adapter`.
    """

    name = "salt"

    def __init__(
        self,
        rank: int = 8,
        top_ratio: float = 0.1,
        reg_weight: float = 0.0,
        target: str = DEFAULT_TARGET,
        start_block: int | None = 0,
        split_qkv: bool = False,
        qkv_slices: Sequence[str] = SLICES,
        train_bias: bool = False,
        trainable: Sequence[str] = (),
    ) -> None:
        super().__init__(target, rank, start_block, split_qkv, qkv_slices, train_bias, trainable)
        if not 0 < top_ratio < 1:
            raise ValueError(f"adapter.top_ratio={top_ratio}: must be in (0, 1)")
        if reg_weight < 0:
            raise ValueError(f"adapter.reg_weight={reg_weight}: must be >= 0")
        self.top_ratio = float(top_ratio)
        self.reg_weight = float(reg_weight)

    def check_rank(self, name: str, layer: nn.Linear) -> None:
        """Raise when ``rank`` exceeds the ``n − r_top`` residual directions of ``layer``."""
        n = min(layer.in_features, layer.out_features)
        rest = n - top_rank(n, self.top_ratio)
        if self.rank > rest:
            raise ValueError(
                f"adapter.rank={self.rank} exceeds the {rest} residual singular directions of {name} "
                f"({layer.out_features}x{layer.in_features}, {n - rest} top values scaled); choose adapter.rank "
                "<= that"
            )

    def wrap(self, name: str, layer: nn.Linear) -> nn.Module:
        """The SALT re-parameterisation of ``layer``."""
        return SALTLinear(layer, self.rank, self.top_ratio, self.reg_weight)
