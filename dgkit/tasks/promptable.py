"""Promptable segmentation (Segment Anything, Kirillov et al., ICCV 2023): one mask per prompt, scored by IoU.

Targets are instance-id maps ``(B, H, W)`` (0 background, ``1..K`` objects, as ``data=sam_corpus`` stores them).
The objective (``method=sam_pretrain``) turns each object into a prompt and a binary target; what reaches
:meth:`PromptableSegmentation.update_metric` is then one mask logit map per prompt ``(N, H, W)`` against its
object's binary mask ``(N, H, W)``. The metric, ``box_miou``, is the mean IoU of those masks over the prompts of a
split (SAM's "mIoU of prompted masks"; the objective validates with tight box prompts, so the score is not
ambiguous). SAM's mask decoder is the head, so :meth:`build_head` gives an identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchmetrics import Metric

from dgkit.tasks.base import Task


class PromptedIoU(Metric):
    """The mean IoU of predicted masks against their objects' masks, over every prompt of a split.

    IoU = |P ∩ T| / |P ∪ T| per mask; a mask whose prediction and target are both empty scores 1.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add binary masks ``(N, H, W)`` (predicted) against ``(N, H, W)`` (true)."""
        if preds.shape != target.shape:
            raise ValueError(f"predicted masks {tuple(preds.shape)} and targets {tuple(target.shape)} differ in shape")
        p, t = preds.bool().flatten(1), target.bool().flatten(1)
        inter, union = (p & t).sum(1).double(), (p | t).sum(1).double()
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        self.total += iou.sum()
        self.count += len(iou)

    def compute(self) -> torch.Tensor:
        """Mean IoU over the masks seen (NaN before any)."""
        return (self.total / self.count).float() if self.count > 0 else torch.tensor(float("nan"))


class PromptableSegmentation(Task):
    """One mask per prompt; the metric is the mean IoU of the prompted masks (``box_miou``)."""

    name = "promptable"
    metric = "box_miou"
    metric_name = "box-prompted mIoU"
    target = "instance ids (B, H, W), 0 = background"
    per_image = False

    def build_head(self, backbone: nn.Module, num_classes: int) -> nn.Module:
        """No head of its own: SAM's prompt encoder and mask decoder (in the backbone) are it."""
        return nn.Identity()

    def features(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """SAM's image embedding ``(B, C, g, g)``."""
        return backbone.forward_features(x)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Refused: the loss depends on the prompts, so it belongs to the objective (``method=sam_pretrain``)."""
        raise ValueError("task=promptable has no per-image loss: train it with method=sam_pretrain")

    def build_metric(self, num_classes: int) -> Metric:
        """A :class:`PromptedIoU` (``num_classes`` is unused: ids are instances, not classes)."""
        return PromptedIoU()

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        """Mask logits ``(N, H, W)`` to binary masks (logit > 0, SAM's ``mask_threshold``)."""
        return outputs > 0

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        """Per-pixel foreground probability of each mask (sigmoid)."""
        return outputs.sigmoid()

    def prediction_records(
        self, outputs: torch.Tensor, sizes: Sequence[tuple[int, int]], classes: Sequence[str]
    ) -> list[dict[str, Any]]:
        """Refused: prompt-free prediction is not defined for a promptable model (fine-tune it, e.g. method=mapsam)."""
        raise ValueError("task=promptable needs prompts; predict with a fine-tuned model (method=mapsam) instead")
