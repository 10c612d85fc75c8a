"""The ``Task`` interface: what a learning problem (classification, segmentation...) owns.

A task owns the target type, the head factory, the loss, the metric (its record key, its name in tables and its
torchmetrics objects) and the prediction rule. :class:`~dgkit.methods.base.Method` delegates to it, so an
objective (ERM, DANN, sharpness...) is written once for every task, and evaluation records are
``<task.metric>/<domain>/<split>``. Adding a task costs its own module plus a ``conf/task`` entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from torchmetrics import Metric


class Task:
    """Base class of tasks (see the module docstring). Subclasses set the class attributes and implement the
    methods below.

    Attributes:
        name: the task's name, stored in checkpoints and run folders (``classification``).
        metric: the selection metric's record key (``acc``, ``miou``); never contains ``/``.
        metric_name: the metric's name in table headings and plot axes (``accuracy``, ``mIoU``).
        target: what a target is, for messages (``class index (B,)``).
        per_image: one target per image, predicted from pooled features. Objectives whose mechanism reads pooled
            per-image features (a domain discriminator, per-sample head gradients) declare it
            (``Method.per_image_mechanism``) and refuse a task where this is false (segmentation).
    """

    name: ClassVar[str]
    metric: ClassVar[str]
    metric_name: ClassVar[str]
    target: ClassVar[str]
    per_image: ClassVar[bool] = True

    def build_head(self, backbone: nn.Module, num_classes: int) -> nn.Module:
        """A fresh head mapping :meth:`features` of ``backbone`` to the task's outputs."""
        raise NotImplementedError

    def features(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """What the head reads from the backbone for a normalised image batch ``x`` (pooled features, or a list of
        intermediate maps for dense tasks)."""
        raise NotImplementedError

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The supervised training loss of ``outputs`` (the head's) against ``targets``."""
        raise NotImplementedError

    def build_metric(self, num_classes: int) -> Metric:
        """A fresh torchmetrics object accumulating :attr:`metric` over one split of one domain."""
        raise NotImplementedError

    def secondary_scores(self, metric: Metric) -> dict[str, torch.Tensor]:
        """Scores recorded beside :attr:`metric` from the same accumulated ``metric`` (e.g. Dice), as
        ``{key: value}``; keys never contain ``/`` and never equal :attr:`metric`. None by default."""
        return {}

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        """The prediction rule: outputs to predicted targets (class indices, label maps)."""
        raise NotImplementedError

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        """Outputs to per-class probabilities (for ``predict.py``'s confidence column)."""
        raise NotImplementedError

    def prediction_records(
        self, outputs: torch.Tensor, sizes: Sequence[tuple[int, int]], classes: Sequence[str]
    ) -> list[dict[str, Any]]:
        """One prediction record per image of a batch, for ``predict.py`` (:mod:`dgkit.predict`): an ordered
        ``{column: value}``. A value is a string or a number (a CSV cell; floats written with 6 decimals) or a
        ``uint8`` array, an image that ``predict.py`` writes as a PNG file and lists in column ``<column>_path``.

        Args:
            outputs: the model's outputs on the batch (those of :meth:`predict`).
            sizes: each image's original ``(H, W)``, before preprocessing resized it to the model's input.
            classes: the class names.
        """
        raise NotImplementedError

    def update_metric(self, metric: Metric, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Accumulate one batch into ``metric``: by default the predicted targets against the true ones."""
        metric.update(self.predict(outputs), targets)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
