"""Image classification: one class index per image, a linear head on pooled features, accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from dgkit.tasks.base import Task


class Classification(Task):
    """Cross-entropy on ``nn.Linear(num_features, num_classes)`` over the pooled backbone features; the metric is
    micro-averaged accuracy (DomainBed's), the prediction the argmax class."""

    name = "classification"
    metric = "acc"
    metric_name = "accuracy"
    target = "class index (B,)"

    def build_head(self, backbone: nn.Module, num_classes: int) -> nn.Module:
        """``nn.Linear(backbone.num_features, num_classes)``."""
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes}: a classifier needs at least 2 classes")
        return nn.Linear(backbone.num_features, num_classes)

    def features(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, num_features)``."""
        return backbone(x)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of logits ``(B, C)`` against class indices ``(B,)``."""
        return F.cross_entropy(outputs, targets)

    def build_metric(self, num_classes: int) -> Metric:
        """Micro-averaged multiclass accuracy."""
        return MulticlassAccuracy(num_classes, average="micro")

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        """The argmax class ``(B,)``."""
        return outputs.argmax(-1)

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        """Softmax over classes ``(B, C)``."""
        return outputs.softmax(-1)

    def prediction_records(
        self, outputs: torch.Tensor, sizes: Sequence[tuple[int, int]], classes: Sequence[str]
    ) -> list[dict[str, Any]]:
        """``{"class": name, "probability": p}`` per image: the argmax class and its softmax probability."""
        predicted = self.predict(outputs)  # (B,)
        probability = self.probabilities(outputs).gather(-1, predicted[:, None])[:, 0]
        return [{"class": classes[c], "probability": p} for c, p in zip(predicted.tolist(), probability.tolist())]
