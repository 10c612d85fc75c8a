"""Semantic segmentation: one class id per pixel, a light decoder on ``forward_intermediates``, mIoU.

Targets are label maps ``(B, H, W)`` int64 with :data:`IGNORE` (255) marking pixels that count for nothing (loss
and metrics). The head (:class:`SegmentationHead`) is an FPN-lite decoder in the spirit of SegFormer's all-MLP
head (Xie et al., NeurIPS 2021): the last ``levels`` intermediate maps of the backbone are projected to one
width by 1x1 convolutions, resized to the finest of them, summed, fused by a 3x3 convolution and classified per
pixel, then upsampled bilinearly by that map's ``reduction`` (timm's ``feature_info``) back to the input size.
A ViT's intermediates are its token grids ``(B, C, H/p, W/p)``, so the same head serves CNNs and ViTs.

The metric (:class:`SegmentationMetric`) accumulates a confusion matrix over a split: mIoU is the selection
metric; Dice, per-class IoU and, for binary tasks, foreground precision, recall and F1 (MapSAM's report) are
read from the same matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from dgkit.tasks.base import Task

IGNORE = 255
"""The mask value of pixels without a label (not counted by the loss nor the metrics)."""


class SegmentationHead(nn.Module):
    """Fuse the last intermediate maps of a backbone and classify every pixel.

    Args:
        in_channels: channels of each intermediate the head reads, coarsest last.
        reduction: the input-to-feature stride of the finest map read (the first one); outputs are upsampled by it.
        num_classes: number of classes.
        width: channels of the fused map.
    """

    def __init__(self, in_channels: list[int], reduction: int, num_classes: int, width: int = 64) -> None:
        super().__init__()
        self.reduction = int(reduction)
        self.project = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.GroupNorm(min(8, width), width), nn.ReLU(inplace=True)
        )
        self.classify = nn.Conv2d(width, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Per-pixel logits ``(B, num_classes, H, W)`` from intermediates ``[(B, C_i, h_i, w_i), ...]``."""
        size = features[0].shape[-2:]  # (h, w) of the finest map
        fused = 0
        for proj, f in zip(self.project, features):
            p = proj(f)  # (B, width, h_i, w_i)
            fused = fused + (p if p.shape[-2:] == size else F.interpolate(p, size=size, mode="bilinear"))
        logits = self.classify(self.fuse(fused))  # (B, K, h, w)
        if self.reduction == 1:
            return logits
        out = (size[0] * self.reduction, size[1] * self.reduction)
        return F.interpolate(logits, size=out, mode="bilinear", align_corners=False)


class SegmentationMetric(Metric):
    """A confusion matrix over the labelled pixels of a split; :meth:`compute` gives mIoU.

    IoU_c = TP / (TP + FP + FN) and Dice_c = 2 TP / (2 TP + FP + FN); the means run over the classes that occur
    (in the targets or the predictions): a class absent from both has no score. Pixels labelled :data:`IGNORE`
    are skipped.

    Args:
        num_classes: number of classes.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.add_state("confmat", torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add predicted label maps ``(B, H, W)`` against the true ones (rows: true class, columns: predicted)."""
        if preds.shape != target.shape:
            raise ValueError(f"predictions {tuple(preds.shape)} and targets {tuple(target.shape)} differ in shape")
        keep = target != IGNORE
        t, p = target[keep].long(), preds[keep].long()
        k = self.num_classes
        self.confmat += torch.bincount(t * k + p, minlength=k * k).reshape(k, k)

    def _counts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cm = self.confmat.double()
        tp = cm.diag()
        return tp, cm.sum(0) - tp, cm.sum(1) - tp  # TP, FP, FN per class

    def per_class_iou(self) -> torch.Tensor:
        """IoU of every class ``(K,)``; NaN for a class absent from targets and predictions."""
        tp, fp, fn = self._counts()
        union = tp + fp + fn
        return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))

    def per_class_dice(self) -> torch.Tensor:
        """Dice (F1) of every class ``(K,)``; NaN for a class absent from targets and predictions."""
        tp, fp, fn = self._counts()
        denom = 2 * tp + fp + fn
        return torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.full_like(tp, float("nan")))

    def dice(self) -> torch.Tensor:
        """Mean Dice over the classes that occur."""
        return self.per_class_dice().nanmean().float()

    def foreground(self) -> dict[str, torch.Tensor]:
        """Precision, recall and F1 of class 1 (binary tasks only, as MapSAM reports them)."""
        if self.num_classes != 2:
            raise ValueError(f"foreground scores are for binary tasks; this one has {self.num_classes} classes")
        tp, fp, fn = (v[1] for v in self._counts())
        precision = tp / (tp + fp) if tp + fp > 0 else tp.new_tensor(0.0)
        recall = tp / (tp + fn) if tp + fn > 0 else tp.new_tensor(0.0)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else tp.new_tensor(0.0)
        return {"precision": precision.float(), "recall": recall.float(), "f1": f1.float()}

    def scores(self) -> dict[str, torch.Tensor]:
        """Every score: ``miou``, ``dice``, ``iou_<c>`` per class and, for binary tasks, foreground ``precision``,
        ``recall``, ``f1``."""
        out = {"miou": self.compute(), "dice": self.dice()}
        out.update({f"iou_{c}": v.float() for c, v in enumerate(self.per_class_iou())})
        if self.num_classes == 2:
            out.update(self.foreground())
        return out

    def compute(self) -> torch.Tensor:
        """Mean IoU over the classes that occur (the selection metric)."""
        return self.per_class_iou().nanmean().float()


class Segmentation(Task):
    """Per-pixel cross-entropy (``ignore_index=255``) on :class:`SegmentationHead` over the last ``levels``
    intermediates of the backbone; the metric is mIoU, the prediction the argmax class of every pixel.

    Args:
        levels: how many of the backbone's last intermediate maps the head fuses.
        width: channels of the head's fused map.
    """

    name = "segmentation"
    metric = "miou"
    metric_name = "mIoU"
    target = "label map (B, H, W), 255 = ignore"
    per_image = False

    def __init__(self, levels: int = 2, width: int = 64) -> None:
        if levels < 1:
            raise ValueError(f"task.levels={levels}: the head reads at least 1 intermediate map")
        if width < 1:
            raise ValueError(f"task.width={width}: must be >= 1")
        self.levels, self.width = int(levels), int(width)

    def build_head(self, backbone: nn.Module, num_classes: int) -> nn.Module:
        """A :class:`SegmentationHead` sized from the backbone's ``feature_info`` (its declared intermediates)."""
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes}: segmentation needs at least 2 classes (with background)")
        info = backbone.feature_info[-self.levels :]
        return SegmentationHead([int(i["num_chs"]) for i in info], int(info[0]["reduction"]), num_classes, self.width)

    def features(self, backbone: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        """The last ``levels`` intermediate maps ``[(B, C_i, h_i, w_i), ...]``, finest first."""
        return backbone.forward_intermediates(x, indices=self.levels, intermediates_only=True)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of logits ``(B, K, H, W)`` against label maps ``(B, H, W)``, 255 ignored."""
        return F.cross_entropy(_to_size(outputs, targets), targets, ignore_index=IGNORE)

    def build_metric(self, num_classes: int) -> Metric:
        """A :class:`SegmentationMetric` (mIoU; Dice, per-class IoU and foreground scores on request)."""
        return SegmentationMetric(num_classes)

    def secondary_scores(self, metric: Metric) -> dict[str, torch.Tensor]:
        """Dice, the IoU of every class (``iou_<c>``) and, for binary tasks, foreground ``precision``, ``recall``
        and ``f1``, recorded as ``<key>/<domain>/<split>`` beside ``miou``."""
        return {k: v for k, v in metric.scores().items() if k != self.metric}

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        """The argmax class of every pixel ``(B, H, W)``."""
        return outputs.argmax(1)

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        """Softmax over classes, per pixel ``(B, K, H, W)``."""
        return outputs.softmax(1)

    def prediction_records(
        self, outputs: torch.Tensor, sizes: Sequence[tuple[int, int]], classes: Sequence[str]
    ) -> list[dict[str, Any]]:
        """``{"mask": class ids (H, W) uint8}`` per image, at the image's original size: the logits are resized
        bilinearly to ``(H, W)`` (as evaluation resizes them to a target's size), then the argmax class of every
        pixel is taken. ``predict.py`` writes each mask as a PNG and lists it as ``mask_path``.

        Raises:
            ValueError: more than 255 classes (the ids would not fit a ``uint8`` mask beside 255 = ignore).
        """
        if outputs.shape[1] > IGNORE:
            raise ValueError(f"{outputs.shape[1]} classes: uint8 masks hold class ids 0..{IGNORE - 1}")
        records = []
        for logits, size in zip(outputs, sizes):  # (K, h, w), (H, W)
            logits = logits[None].float()
            if tuple(logits.shape[-2:]) != tuple(size):
                logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
            records.append({"mask": self.predict(logits)[0].to(torch.uint8).cpu().numpy()})
        return records

    def update_metric(self, metric: Metric, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Accumulate the predicted label maps (at the targets' size) into ``metric``."""
        metric.update(self.predict(_to_size(outputs, targets)), targets)

    def __repr__(self) -> str:
        return f"Segmentation(levels={self.levels}, width={self.width})"


def _to_size(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Logits ``(B, K, h, w)`` resized bilinearly to the targets' ``(H, W)`` when a stride did not divide the input."""
    if outputs.shape[-2:] == targets.shape[-2:]:
        return outputs
    return F.interpolate(outputs, size=targets.shape[-2:], mode="bilinear", align_corners=False)
