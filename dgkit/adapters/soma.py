"""SoMA: Singular Value Decomposed Minor Components Adaptation (Yun et al., CVPR 2025, arXiv 2412.04077).

Each target linear ``W = U diag(σ) Vᵀ`` (full fp32 ``torch.linalg.svd``, after the pretrained weights are loaded)
keeps its ``r`` smallest singular triplets as the trainable factors ``A = √(σ_m/s) V_mᵀ``, ``B = U_m √(σ_m/s)``;
the frozen residual ``W_res = W − s·B·A`` holds the principal part, so the output is unchanged at init. Early
blocks stay frozen (``start_block``), the adapted layers' biases train, and the weight decay is annealed
(cosine from its configured value to 1e-5, :class:`AnnealedWeightDecay`).

Hand-written: peft has PiSSA's principal-component init but no minor-component one, and its SVD-lowrank
variants approximate the *largest* triplets (which silently gives PiSSA). ``W_res`` is stored in the state
dict (``<layer>.base.weight``), so a checkpoint reloads without re-running the SVD on other weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from dgkit.adapters.core import AdapterLinear
from dgkit.adapters.qkv import SLICES
from dgkit.adapters.spec import DEFAULT_TARGET, Adapter

COMPONENTS = ("minor", "principal")


class SVDLinear(AdapterLinear):
    """A linear layer re-parameterised as ``W_res + s·B·A`` with ``B·A`` from ``r`` singular triplets of ``W``.

    Args:
        base: the pretrained layer; its weight is replaced by the residual ``W_res`` (in place).
        rank: ``r``, the number of singular triplets moved into the trainable factors.
        alpha: the scale numerator (``s = alpha / r``).
        components: ``minor`` (the ``r`` smallest, SoMA/MiLoRA) or ``principal`` (the largest, PiSSA; ablation).
    """

    def __init__(self, base: nn.Linear, rank: int = 16, alpha: float = 16.0, components: str = "minor") -> None:
        super().__init__(base)
        if components not in COMPONENTS:
            raise ValueError(f"components={components!r}; choose one of {', '.join(COMPONENTS)}")
        self.scaling = float(alpha) / rank
        w = base.weight.detach()
        u, sigma, vh = torch.linalg.svd(w.float(), full_matrices=False)  # σ descending; (out, n), (n,), (n, in)
        n = sigma.numel()
        idx = slice(n - rank, n) if components == "minor" else slice(0, rank)
        root = (sigma[idx] / self.scaling).sqrt()  # (r,)
        a = root[:, None] * vh[idx]  # (r, in)
        b = u[:, idx] * root[None, :]  # (out, r)
        self.lora_A = nn.Parameter(a.to(w.dtype))
        self.lora_B = nn.Parameter(b.to(w.dtype))
        with torch.no_grad():
            base.weight.copy_((w.float() - self.scaling * b @ a).to(w.dtype))  # W_res: the other n - r triplets

    def delta_weight(self) -> torch.Tensor:
        """``s·B·A`` ``(out, in)``."""
        return self.scaling * self.lora_B @ self.lora_A

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``s·(x Aᵀ) Bᵀ`` ``(..., out)``."""
        return self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)


class AnnealedWeightDecay(pl.Callback):
    """Cosine-anneal each optimiser group's weight decay from its initial value to ``eta_min`` over training.

    ``wd_t = eta_min + (wd_0 − eta_min)(1 + cos(π t / T))/2`` with ``T = trainer.max_steps``; groups whose initial
    decay is 0 are left alone (annealing them would *raise* their decay). ``wd_0`` is kept in the group as
    ``initial_weight_decay``, which the optimiser state saves, so a resumed run continues the same schedule.

    Args:
        eta_min: the final weight decay (SoMA: 1e-5).
    """

    def __init__(self, eta_min: float = 1e-5) -> None:
        self.eta_min = float(eta_min)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        """Set this step's weight decay on every group."""
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        progress = min(trainer.global_step / max(total, 1), 1.0)
        factor = (1 + math.cos(math.pi * progress)) / 2
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                wd0 = group.setdefault("initial_weight_decay", group.get("weight_decay", 0.0))
                if wd0 > 0:
                    group["weight_decay"] = self.eta_min + (wd0 - self.eta_min) * factor


class SoMA(Adapter):
    """SoMA: minor singular components as LoRA factors on q, k, v (split), proj, fc1 and fc2 of late blocks.

    Args:
        rank: ``r`` (official: 16).
        alpha: scale numerator (official: 16, so ``s = 1``).
        components: ``minor`` (SoMA) or ``principal`` (PiSSA, for ablation).
        wd_min: the annealed weight decay's final value (the initial one is the optimiser's).
        target, start_block, split_qkv, qkv_slices, train_bias, trainable: as in
            :class:`~dgkit.adapters.spec.Adapter` (SoMA: ``start_block`` one third of the depth, ``split_qkv``
            and ``train_bias`` on; norms, position and patch embeddings frozen).
    """

    name = "soma"

    def __init__(
        self,
        rank: int = 16,
        alpha: float = 16.0,
        components: str = "minor",
        wd_min: float = 1e-5,
        target: str = DEFAULT_TARGET,
        start_block: int | None = None,
        split_qkv: bool = True,
        qkv_slices: Sequence[str] = SLICES,
        train_bias: bool = True,
        trainable: Sequence[str] = (),
    ) -> None:
        super().__init__(target, rank, start_block, split_qkv, qkv_slices, train_bias, trainable)
        if components not in COMPONENTS:
            raise ValueError(f"adapter.components={components!r}; choose one of {', '.join(COMPONENTS)}")
        if alpha <= 0 or wd_min < 0:
            raise ValueError(f"adapter.alpha={alpha} must be > 0 and adapter.wd_min={wd_min} >= 0")
        self.alpha = float(alpha)
        self.components = components
        self.wd_min = float(wd_min)

    def wrap(self, name: str, layer: nn.Linear) -> nn.Module:
        """The SVD re-parameterisation of ``layer``."""
        return SVDLinear(layer, self.rank, self.alpha, self.components)

    def callbacks(self) -> list[pl.Callback]:
        """The annealed weight decay."""
        return [AnnealedWeightDecay(self.wd_min)]

    def step_budget_dependence(self) -> list[str]:
        """The weight-decay annealing runs over ``max_steps``."""
        return ["SoMA's annealed weight decay (cosine over max_steps)"]
