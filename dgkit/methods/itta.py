"""ITTA, Improved Test-Time Adaptation (Chen et al., CVPR 2023; liangchen527/ITTA): training with a learnable
consistency loss. The test-time half (mapping parameters after each stage) is ``tta=itta`` (:mod:`dgkit.tta.itta`).

Per step (``../shared/methods/dg_objectives_and_tta.md`` §4.4), with ``z`` the clean pooled features and
``z_aug`` the features of the same images with MixStyle after stage 1 or 2 (probability 1/2 each):

1. backbone + classifier: Adam step on ``CE(z) + CE(z_aug) + L_reg``, ``L_reg = mean(f_w(z_aug - z)²)``, where
   ``f_w`` is a 10-layer element-wise network (weights 1, biases 0 at init: the plain MSE).
2. ``f_w`` only (Adam, ``lr_w``): ``0.1 · MSE(zscore(∇_θ L_reg), zscore(∇_θ L_cls))`` over the backbone
   parameters θ (double back-propagation; the classification gradient is a constant), so the learned loss
   yields gradients that point like the classification ones.

Supports the backbones that declare ``stages()`` (:mod:`dgkit.backbones.stages`: small CNNs, timm ResNets and ViTs).
MixStyle and ``f_w`` are hand-written (a few lines each; the official code is DomainBed scripts, not a library).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dgkit.backbones.stages import backbone_stages
from dgkit.methods.base import Method
from dgkit.tasks import Task

Batch = dict[str, tuple[torch.Tensor, torch.Tensor]]


def mixstyle(h: torch.Tensor, rng: np.random.Generator | None = None, alpha: float = 0.1) -> torch.Tensor:
    """MixStyle (Zhou et al., ICLR 2021): mix each sample's channel mean/std (over space, or over the tokens of a
    ViT) with those of a shuffled sample, weight ``λ ~ Beta(alpha, alpha)`` per sample; the statistics are
    detached, as in MixStyle. ``rng`` (NumPy) makes the draws reproducible (default: from NumPy's global one)."""
    rng = rng if rng is not None else np.random.default_rng(int(np.random.randint(2**31)))
    b = h.shape[0]
    dims = (2, 3) if h.dim() == 4 else (1,)  # feature maps (B, C, H, W) or ViT tokens (B, N, C)
    mu = h.mean(dim=dims, keepdim=True).detach()
    sig = (h.var(dim=dims, keepdim=True) + 1e-6).sqrt().detach()
    lam = torch.as_tensor(rng.beta(alpha, alpha, size=(b,) + (1,) * (h.dim() - 1)), dtype=h.dtype, device=h.device)
    perm = torch.as_tensor(rng.permutation(b), device=h.device)
    mu_mix = lam * mu + (1 - lam) * mu[perm]
    sig_mix = lam * sig + (1 - lam) * sig[perm]
    return (h - mu) / sig * sig_mix + mu_mix


class LearnedConsistency(nn.Module):
    """``f_w(u) = w_L ⊙ ReLU(… ReLU(w_1 ⊙ u + b_1) …) + b_L`` on ``(B, D)`` feature differences; the loss is
    ``mean(f_w(u)²)``. With ``w = 1, b = 0`` (init) on ``u >= 0`` it is the plain MSE."""

    def __init__(self, dim: int, depth: int = 10) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"method.loss_depth={depth} must be >= 1")
        self.weight = nn.Parameter(torch.ones(depth, dim))
        self.bias = nn.Parameter(torch.zeros(depth, dim))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """The consistency loss ``mean(f_w(u)²)`` (a scalar)."""
        for i in range(len(self.weight)):
            u = self.weight[i] * u + self.bias[i]
            if i < len(self.weight) - 1:
                u = F.relu(u)
        return u.pow(2).mean()


def _zscore(g: torch.Tensor) -> torch.Tensor:
    return (g - g.mean()) / (g.std() + 1e-8)


class ITTA(Method):
    """ITTA's training objective (see the module docstring).

    Args:
        backbone, num_classes, domains, test_domains, optimizer, scheduler: as in
            :class:`~dgkit.methods.base.Method` (``optimizer`` steps the backbone and classifier).
        lr_w: Adam learning rate of the learned loss (official: 0.1 × the model's lr).
        penalty: weight of the gradient-matching loss (official 0.1).
        loss_depth: layers of the learned loss (official 10).
    """

    per_image_mechanism = "its consistency loss and learned mapping act on pooled per-image features"

    double_backward: ClassVar[bool] = True  # torch.compile cannot run it (trainer.compile is refused)

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        domains: Sequence[str],
        test_domains: Sequence[str],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        lr_w: float = 1e-4,
        penalty: float = 0.1,
        loss_depth: int = 10,
        task: Task | None = None,
    ) -> None:
        super().__init__(backbone, num_classes, domains, test_domains, optimizer, scheduler, task=task)
        self.stages = backbone_stages(backbone, "method=itta")  # fails early on an unsupported backbone
        for module in backbone.modules():  # timm attention: the fused SDPA kernel has no double backward on CPU
            if hasattr(module, "fused_attn"):
                module.fused_attn = False
        self.consistency = LearnedConsistency(backbone.num_features, loss_depth)
        self.lr_w, self.penalty = float(lr_w), float(penalty)
        self.automatic_optimization = False

    def features_pair(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean features and features with MixStyle after stage 1 or 2 (drawn per step), both ``(B, D)``."""
        where = int(torch.randint(0, 2, ()).item())
        z = self.stages.forward(x)
        z_aug = self.stages.forward(x, lambda i, h: mixstyle(h) if i == where else h)
        return z, z_aug

    def training_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Step 1's loss: ``{"loss", "ce", "ce_aug", "consistency"}``."""
        x, y = self.concat(batch)
        z, z_aug = self.features_pair(x)
        ce, ce_aug = self.task.loss(self.classifier(z), y), self.task.loss(self.classifier(z_aug), y)
        reg = self.consistency(z_aug - z)
        return {"loss": ce + ce_aug + reg, "ce": ce, "ce_aug": ce_aug, "consistency": reg}

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        """Step 1 (model) then step 2 (learned loss), each with its own optimiser."""
        opt_model, opt_w = self.optimizers()
        losses = self.training_losses(batch)
        opt_model.zero_grad()
        self.manual_backward(losses["loss"])
        self.consistency.zero_grad(set_to_none=True)  # the learned loss is stepped by step 2 only
        opt_model.step()
        # step 2: match the learned loss's backbone gradients to the classification gradients
        params = [p for p in self.backbone.parameters() if p.requires_grad]
        x, y = self.concat(batch)
        z, z_aug = self.features_pair(x)
        cls = self.task.loss(self.classifier(z), y) + self.task.loss(self.classifier(z_aug), y)
        g_cls = torch.autograd.grad(cls, params, retain_graph=True, allow_unused=True)
        g_reg = torch.autograd.grad(self.consistency(z_aug - z), params, create_graph=True, allow_unused=True)
        pairs = [(a, b) for a, b in zip(g_reg, g_cls) if a is not None and b is not None]
        flat_reg = torch.cat([a.flatten() for a, _ in pairs])
        flat_cls = torch.cat([b.flatten() for _, b in pairs]).detach()
        match = self.penalty * F.mse_loss(_zscore(flat_reg), _zscore(flat_cls))
        w_grads = torch.autograd.grad(match, list(self.consistency.parameters()), allow_unused=True)
        for p, g in zip(self.consistency.parameters(), w_grads):
            p.grad = g
        # the raw optimiser: Lightning counts every wrapped step in global_step, and max_steps means batches here
        opt_w.optimizer.step()
        self.log_losses({**losses, "grad_match": match.detach()}, len(y))
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def configure_optimizers(self):
        """The configured optimiser on backbone + classifier, and Adam(``lr_w``) on the learned loss."""
        model_params = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("consistency.")]
        opt_model = self.optimizer_factory(model_params)
        opt_w = torch.optim.Adam(self.consistency.parameters(), lr=self.lr_w)
        if self.scheduler_factory is None:
            return [opt_model, opt_w]
        return [opt_model, opt_w], [{"scheduler": self.scheduler_factory(opt_model), "interval": "step"}]
