"""Empirical risk minimisation (Vapnik, 1998): cross-entropy on the pooled source batches.

The baseline DomainBed found hard to beat when model selection is done honestly (Gulrajani & Lopez-Paz, 2021).
"""

from __future__ import annotations

import torch

from dgkit.methods.base import Method


class ERM(Method):
    """The task's loss (cross-entropy for classification) over the concatenation of every source domain's batch
    (and its BSS copy, if configured)."""

    def training_losses(self, batch: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``{"loss": task loss}`` over all source images of the step."""
        x, y = self.with_bss_copy(*self.concat(batch))  # (B or 2B, C, H, W): + BSS copy under +augment=bss
        return {"loss": self.task.loss(self(x), y)}
