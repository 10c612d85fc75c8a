"""Normalisation-layer TTAs: ``bn_adapt`` (test-batch statistics) and ``tent`` (entropy minimisation).

Hand-written: no maintained library ships Tent or BN adaptation for arbitrary PyTorch models (the official
``DequanWang/tent`` is a script-level repository, not a package); both are a few lines over ``torch.nn``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

from dgkit.tta.base import TestTimeAdapter, entropy

log = logging.getLogger(__name__)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_AFFINE_NORMS = (*_BN, nn.LayerNorm, nn.GroupNorm)


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer of ``model``."""
    return [m for m in model.modules() if isinstance(m, _BN)]


def use_batch_statistics(model: nn.Module, what: str) -> list[nn.Module]:
    """Put every BatchNorm of ``model`` in train mode without running statistics, so each test batch is
    normalised with its own mean and variance; raise if there is none (``what`` names the TTA)."""
    layers = batchnorm_layers(model)
    if not layers:
        found = sorted({type(m).__name__ for m in model.modules() if isinstance(m, _AFFINE_NORMS)}) or ["none"]
        raise ValueError(
            f"tta={what} needs BatchNorm layers in the backbone, and this one has none (its normalisation layers: "
            f"{', '.join(found)}): train with a BatchNorm backbone (backbone.norm=batch for small_cnn/small_cnn_lite, "
            "resnet18, resnet50), or use tta=tent (LayerNorm/GroupNorm affine), t3a or adanpc"
        )
    for bn in layers:
        bn.train()
        bn.track_running_stats = False
        bn.running_mean, bn.running_var = None, None
    return layers


class BNAdapt(TestTimeAdapter):
    """``tta=bn_adapt``: normalise with each test batch's own statistics (Schneider et al. 2020; Tent's
    "norm" baseline). No gradients; the running statistics of the source model are not used. Any task: on a
    segmentation model the statistics are those of the batch's feature maps, as for classification."""

    name = "bn_adapt"
    per_image_mechanism = None

    def setup(self, source: Iterable) -> None:
        """Switch BatchNorm to batch statistics (error without BatchNorm)."""
        use_batch_statistics(self.backbone, self.name)


class Tent(TestTimeAdapter):
    """``tta=tent`` (Wang et al., ICLR 2021): per test batch, ``steps`` optimiser steps on the mean prediction
    entropy, updating only the affine parameters of the normalisation layers; the prediction is the output of
    the first forward. BatchNorm uses batch statistics (as in Tent); on a backbone without BatchNorm (ViTs) the
    LayerNorm/GroupNorm affine parameters are adapted instead, which is Tent's recipe transposed, not the
    paper's setting: a warning names the layers. On a segmentation model the loss is the entropy of every pixel's
    prediction averaged over the batch's pixels (none ignored: test labels are never read), and the prediction is
    per pixel.

    Args:
        optimizer: a partial taking the parameters (Tent's CIFAR default: Adam, lr 1e-3).
        steps: optimiser steps per batch (>= 1; Tent: 1).
        reset, batch_size: see :class:`~dgkit.tta.base.TestTimeAdapter`.
    """

    needs_grad = True
    name = "tent"
    per_image_mechanism = None

    def __init__(
        self,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        steps: int = 1,
        reset: str = "per_domain",
        batch_size: int = 64,
    ) -> None:
        super().__init__(reset, batch_size)
        if steps < 1:
            raise ValueError(f"tta.steps={steps} must be >= 1")
        self.steps = int(steps)
        if reset == "per_batch":
            log.warning(
                "tta=tent with tta.reset=per_batch predicts every batch with the unadapted model: Tent's prediction "
                "is the forward before its update (as in the official code), and the update is then discarded. "
                "Accuracy cannot change; use tta.reset=per_domain (default) or never"
            )
        self.optimizer_factory = optimizer or (lambda params: torch.optim.Adam(params, lr=1e-3))
        self.optimizer: torch.optim.Optimizer | None = None
        self.adapted: list[str] = []

    def setup(self, source: Iterable) -> None:
        """Batch statistics for BatchNorm; make the norm layers' affine parameters the only trainable ones."""
        norms = [(n, m) for n, m in self.backbone.named_modules() if isinstance(m, _AFFINE_NORMS)]
        if batchnorm_layers(self.backbone):
            use_batch_statistics(self.backbone, self.name)
            norms = [(n, m) for n, m in norms if isinstance(m, _BN)]
        elif norms:
            log.warning(
                "tta=tent: the backbone has no BatchNorm, so Tent adapts the affine parameters of its %d "
                "LayerNorm/GroupNorm layers (%s): Tent's recipe transposed, not the paper's setting",
                len(norms), ", ".join(n for n, _ in norms),
            )  # fmt: skip
        if not norms:
            raise ValueError("tta=tent needs normalisation layers (BatchNorm, LayerNorm or GroupNorm) in the backbone")
        params = []
        for name, module in norms:
            for pname, p in module.named_parameters(recurse=False):
                p.requires_grad_(True)
                params.append(p)
                self.adapted.append(f"{name}.{pname}")
        if not params:
            raise ValueError("tta=tent: the backbone's normalisation layers have no affine parameters to adapt")
        self.optimizer = self.optimizer_factory(params)

    def state(self) -> dict:
        """The optimiser state (reset with the weights, so an episode starts from fresh moments)."""
        return {"optimizer": self.optimizer.state_dict()}

    def load_state(self, state: dict) -> None:
        """Restore the optimiser state."""
        self.optimizer.load_state_dict(state["optimizer"])

    @staticmethod
    def loss(logits: torch.Tensor) -> torch.Tensor:
        """Tent's objective: the mean prediction entropy, over images ``(B, C)`` or over pixels ``(B, C, H, W)``."""
        return entropy(logits).mean()

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Forward, entropy step(s), and the first forward's logits."""
        first = None
        for _ in range(self.steps):
            logits = self.forward(x)
            first = logits.detach() if first is None else first
            loss = self.loss(logits)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return first
