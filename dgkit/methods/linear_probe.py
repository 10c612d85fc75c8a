"""Linear evaluation of a pre-trained backbone (the protocol of SimCLR, Chen et al., ICML 2020, and of the
BSS paper's unsupervised DG experiments, Scalbert et al., ICLR 2024).

The backbone (typically ``backbone.weights=<ssl run>/backbone.safetensors``) is frozen: no gradients and
always in eval mode, so batch-norm statistics stay those of pre-training. Only the linear head learns, with
cross-entropy on the labelled source images (``data.labels_per_class=k`` for few labels).

``feature_norm=true`` (default) puts a batch normalisation *without* affine parameters between the frozen
features and the linear layer, as MoCo v3 (Chen et al., 2021) and MAE (He et al., 2022) do for linear probing:
the probe then sees standardised features, so a fixed optimiser schedule fits backbones whose feature scales
differ by orders of magnitude (a random-init GroupNorm CNN's pooled features vary by about 0.2 across images;
with raw features, Adam 1e-3 for 600 steps barely moves the loss from ln 10). The normalisation has no
learnable parameters; its running statistics are part of the head, so evaluation and export use them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from dgkit.methods.base import Method
from dgkit.tasks import Task


class LinearProbe(Method):
    """Cross-entropy on a linear head over frozen backbone features.

    Args:
        backbone: a built (pre-trained) backbone; it is frozen here.
        num_classes: number of classes.
        domains: every domain of the benchmark, in order.
        test_domains: the held-out domains.
        optimizer: ``partial`` taking the parameters (only the head's are trainable).
        scheduler: optional ``partial`` taking the optimiser.
        feature_norm: standardise the frozen features with a parameter-free batch norm before the linear layer.
    """

    per_image_mechanism = "its head is a linear layer (after a BatchNorm1d) on pooled per-image features"

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        domains: Sequence[str],
        test_domains: Sequence[str],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        feature_norm: bool = True,
        task: Task | None = None,
    ) -> None:
        super().__init__(backbone, num_classes, domains, test_domains, optimizer, scheduler, task=task)
        self.backbone.requires_grad_(False)
        if feature_norm:
            self.classifier = nn.Sequential(nn.BatchNorm1d(backbone.num_features, affine=False), self.classifier)

    def train(self, mode: bool = True) -> LinearProbe:
        """Switch train/eval mode; the frozen backbone always stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    def training_losses(self, batch: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``{"loss": CE}`` of the head on frozen features of all source images (+ BSS copy if configured)."""
        x, y = self.with_bss_copy(*self.concat(batch))  # (B, C, H, W), (B,)
        with torch.no_grad():
            features = self.backbone(x)  # (B, num_features)
        return {"loss": self.task.loss(self.classifier(features), y)}
