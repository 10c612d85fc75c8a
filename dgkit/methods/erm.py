"""Empirical risk minimisation (Vapnik, 1998): cross-entropy on the pooled source batches.

The baseline DomainBed found hard to beat when model selection is done honestly (Gulrajani & Lopez-Paz, 2021).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dgkit.methods.base import Method


class ERM(Method):
    """Cross-entropy over the concatenation of every source domain's batch."""

    def training_losses(self, batch: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``{"loss": CE}`` over all source images of the step."""
        x, y = self.concat(batch)
        return {"loss": F.cross_entropy(self(x), y)}
