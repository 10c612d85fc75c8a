"""T3A, Test-Time Template Adjuster (Iwasawa & Matsuo, NeurIPS 2021), for any backbone with a linear head.

Hand-written (the official ``matsuolab/T3A`` is DomainBed scripts, not a library). Differences from the
official code: ``filter_k=-1`` keeps every support (the official slice ``[:-1]`` drops one per class and batch).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from dgkit.tta.base import TestTimeAdapter, entropy


class T3A(TestTimeAdapter):
    """``tta=t3a``: class templates from pseudo-labelled test features, no gradients.

    State: supports ``S`` (initialised to the classifier's weight rows), their one-hot pseudo-labels and
    entropies. Per batch: append the batch's features with the head's argmax and entropy, keep the
    ``filter_k`` lowest-entropy supports per class (``-1``: all), templates ``T = normalize(S)ᵀ L`` with each
    class column L2-normalised, logits ``z · T``.

    Args:
        filter_k: supports kept per class (>= 1, or -1 for all; official grid 1, 5, 20, 50, 100, -1).
        reset, batch_size: see :class:`~dgkit.tta.base.TestTimeAdapter`.
    """

    name = "t3a"
    per_image_mechanism = "its class templates are built from pooled per-image features and a linear head"

    def __init__(self, filter_k: int = 100, reset: str = "per_domain", batch_size: int = 64) -> None:
        super().__init__(reset, batch_size)
        if filter_k != -1 and filter_k < 1:
            raise ValueError(f"tta.filter_k={filter_k} must be >= 1, or -1 to keep every support")
        self.filter_k = int(filter_k)

    def setup(self, source: Iterable) -> None:
        """Initial supports: the classifier's weight rows, labelled by the head's argmax on them."""
        weight = getattr(self.classifier, "weight", None)
        if weight is None or weight.dim() != 2:
            raise ValueError("tta=t3a needs a linear classifier head (a 2-D `weight`)")
        with torch.no_grad():
            logits = self.classifier(weight)
        self.num_classes = weight.shape[0]
        self.supports = weight.detach().clone()
        self.labels = F.one_hot(logits.argmax(1), self.num_classes).float()
        self.entropies = entropy(logits)

    def state(self) -> dict:
        """Supports, pseudo-labels and entropies."""
        return {"supports": self.supports, "labels": self.labels, "entropies": self.entropies}

    def load_state(self, state: dict) -> None:
        """Restore the supports."""
        self.supports, self.labels, self.entropies = state["supports"], state["labels"], state["entropies"]

    def templates(self) -> torch.Tensor:
        """``(D, C)``: per class, the L2-normalised sum of the L2-normalised supports labelled with it."""
        return F.normalize(F.normalize(self.supports, dim=1).T @ self.labels, dim=0)

    def _filter(self) -> None:
        """Keep the ``filter_k`` lowest-entropy supports of each class."""
        if self.filter_k == -1:
            return
        classes = self.labels.argmax(1)
        keep = []
        for c in range(self.num_classes):
            idx = (classes == c).nonzero().flatten()
            order = self.entropies[idx].argsort()[: self.filter_k]
            keep.append(idx[order])
        keep = torch.cat(keep).sort().values
        self.supports, self.labels, self.entropies = self.supports[keep], self.labels[keep], self.entropies[keep]

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Add the batch to the supports (before predicting, as in T3A), filter, and score by the templates."""
        z = self.backbone(x)
        logits = self.classifier(z)
        self.supports = torch.cat([self.supports, z])
        self.labels = torch.cat([self.labels, F.one_hot(logits.argmax(1), self.num_classes).float()])
        self.entropies = torch.cat([self.entropies, entropy(logits)])
        self._filter()
        return z @ self.templates()
