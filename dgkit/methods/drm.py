"""DRM, Domain-specific Risk Minimization (Zhang et al., KDD 2023; yfzhang114/AdaNPC ``algorithms.py::DRM``):
a shared featurizer with one linear head per source domain plus one shared head trained on every domain.

Loss per step: ``(1/S) Σ_d ½ [CE(h_d(z_d), y_d) + CE(h_all(z_d), y_d)]`` over the ``S`` source domains. Plain
inference picks, per batch, the head with the lowest mean prediction entropy (the paper's ``entropy`` rule);
the test-time ensemble and online steering are the ``tta=drm`` wrapper (:mod:`dgkit.tta.drm`). The shared head
is the base class's ``classifier``, so every other TTA (AdaNPC, T3A, Tent) works on a DRM checkpoint too.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from dgkit.adapters import merge
from dgkit.methods.base import Method
from dgkit.tasks import Task

Batch = dict[str, tuple[torch.Tensor, torch.Tensor]]


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the softmax entropy, for logits ``(..., B, C)`` -> ``(...)``."""
    log_p = logits.log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1).mean(-1)


class DRMInference(nn.Module):
    """DRM for deployment: per batch, the logits of the head (source domains' and shared) with the lowest mean
    prediction entropy, as :meth:`DRM.forward` computes them."""

    def __init__(self, backbone: nn.Module, heads: nn.ModuleList) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, C)`` of the lowest-entropy head on this batch."""
        z = self.backbone(x)
        logits = torch.stack([h(z) for h in self.heads])  # (S + 1, B, C)
        return logits[mean_entropy(logits).argmin()]


class DRM(Method):
    """Per-domain heads + a shared head (see the module docstring).

    Args:
        backbone, num_classes, domains, test_domains, optimizer, scheduler: as in
            :class:`~dgkit.methods.base.Method`.
    """

    per_image_mechanism = (
        "its per-domain heads read pooled per-image features and its inference rule mixes per-image logits"
    )

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        domains: Sequence[str],
        test_domains: Sequence[str],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        task: Task | None = None,
    ) -> None:
        super().__init__(backbone, num_classes, domains, test_domains, optimizer, scheduler, task=task)
        self.heads = nn.ModuleList(nn.Linear(backbone.num_features, num_classes) for _ in self.source_domains)

    def all_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Logits of every head ``(S + 1, B, C)``: the source domains' heads in order, then the shared head."""
        return torch.stack([*(h(z) for h in self.heads), self.classifier(z)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the head with the lowest mean prediction entropy on this batch (DRM's ``entropy`` rule)."""
        logits = self.all_logits(self.backbone(x))  # (S + 1, B, C)
        return logits[mean_entropy(logits).argmin()]

    def to_inference(self) -> nn.Module:
        """Merged backbone and every head, with DRM's entropy rule (see :class:`DRMInference`)."""
        backbone = merge(copy.deepcopy(self.backbone))
        heads = nn.ModuleList([*copy.deepcopy(self.heads), copy.deepcopy(self.classifier)])
        return DRMInference(backbone, heads).eval()

    def training_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``{"loss", "domain_ce", "shared_ce"}``: each domain's head and the shared head on that domain's batch."""
        x, _ = self.concat(batch)
        z = self.backbone(x)  # one pass for every domain (BatchNorm sees the whole step, as in ERM)
        sizes = [len(y) for _, y in batch.values()]
        domain_ce, shared_ce = z.new_zeros(()), z.new_zeros(())
        for domain, z_d, (_, y_d) in zip(batch, z.split(sizes), batch.values()):
            head = self.heads[self.source_domains.index(domain)]
            domain_ce = domain_ce + self.task.loss(head(z_d), y_d)
            shared_ce = shared_ce + self.task.loss(self.classifier(z_d), y_d)
        domain_ce, shared_ce = domain_ce / len(batch), shared_ce / len(batch)
        return {"loss": 0.5 * (domain_ce + shared_ce), "domain_ce": domain_ce, "shared_ce": shared_ce}
