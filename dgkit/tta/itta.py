"""ITTA's test-time half (Chen et al., CVPR 2023; liangchen527/ITTA ``misc.accuracy_tsc``): element-wise mapping
parameters after every backbone stage, adapted per test batch by one step on the learned consistency loss.

Per batch: the features ``z`` (mapped network, clean) and ``z_aug`` (mapped network, MixStyle after stage 1 or
2); one optimiser step on ``ada_lr · f_w(z_aug − z)`` over the mapping parameters only (backbone, classifier and
``f_w`` frozen); then the prediction on the clean path with the updated mapping. ``f_w`` comes from a
``method=itta`` checkpoint; any other checkpoint falls back to the fixed loss ``mean((z_aug − z)²)`` (``f_w`` at
its identity initialisation), and the log says so.

Differences from the official code (``../shared/methods/dg_objectives_and_tta.md`` §4.4): reset per test domain
by default (the official mapping never resets, across domains and splits); no ReLU between the mapping's
affine layers (dgkit's stages may end in a normalisation layer whose output is negative, where the official
ResNet stages end in a ReLU, so the chain stays the identity at initialisation); ``ada_lr`` defaults to 1 (the
official 1e-6 mostly interacts with Adam's epsilon, Adam being scale-invariant otherwise).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from dgkit.backbones.stages import Stages, backbone_stages
from dgkit.methods.itta import LearnedConsistency, mixstyle
from dgkit.tta.base import TestTimeAdapter

log = logging.getLogger(__name__)


class ElementwiseMapping(nn.Module):
    """A chain of ``depth`` element-wise affine maps over a feature map ``(C, H, W)``; the identity at init."""

    def __init__(self, shape: tuple[int, ...], depth: int = 5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(depth, *shape))
        self.bias = nn.Parameter(torch.zeros(depth, *shape))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` ``(B, C, H, W)`` through the chain."""
        for w, b in zip(self.weight, self.bias):
            h = w * h + b
        return h


class ITTAAdapter(TestTimeAdapter):
    """``tta=itta``: test-time mapping parameters adapted with the learned consistency loss.

    Args:
        optimizer: a partial taking the mapping parameters (official: Adam, 0.1 × the training lr).
        ada_lr: multiplier of the consistency loss (official 1e-6; see the module docstring).
        depth: affine layers per mapping (official 5).
        seed: seed of the MixStyle draws (stage, mixing weights, partner order).
        reset, batch_size: see :class:`~dgkit.tta.base.TestTimeAdapter`.
    """

    needs_grad = True
    name = "itta"
    per_image_mechanism = "its consistency loss and prediction read the pooled per-image features"

    def __init__(
        self,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        ada_lr: float = 1.0,
        depth: int = 5,
        seed: int = 0,
        reset: str = "per_domain",
        batch_size: int = 64,
    ) -> None:
        super().__init__(reset, batch_size)
        if depth < 1:
            raise ValueError(f"tta.depth={depth} must be >= 1")
        self.optimizer_factory = optimizer or (lambda params: torch.optim.Adam(params, lr=1e-4))
        self.ada_lr, self.depth, self.seed = float(ada_lr), int(depth), int(seed)
        self._learned: nn.Module | None = None
        self.fixed_loss = False

    def model_parts(self, method: nn.Module) -> tuple[nn.Module, nn.Module]:
        """Backbone and head; take the learned loss ``consistency`` if it was trained with ``method=itta``."""
        backbone_stages(method.backbone, "tta=itta")  # fails early, before any copy, on an unsupported backbone
        self._learned = getattr(method, "consistency", None)
        return method.backbone, method.classifier

    def setup(self, source: Iterable) -> None:
        """Stage split, one identity mapping per stage output (shapes from a dummy forward), the optimiser."""
        self.stages: Stages = backbone_stages(self.backbone, "tta=itta")
        shapes: list[tuple[int, ...]] = []
        size = self.backbone.data_config.input_size
        probe = torch.zeros(1, 3, *size, device=self.device)
        with torch.no_grad():
            self.stages.forward(probe, lambda i, h: shapes.append(tuple(h.shape[1:])) or h)
        self.mapping = nn.ModuleList(ElementwiseMapping(tuple(s), self.depth) for s in shapes).to(self.device)
        if isinstance(self._learned, LearnedConsistency):
            self.loss = LearnedConsistency(self._learned.weight.shape[1], len(self._learned.weight))
            self.loss.load_state_dict(self._learned.state_dict())
        else:
            self.fixed_loss = True
            self.loss = LearnedConsistency(self.backbone.num_features, 1)  # w = 1, b = 0: mean((z_aug - z)²)
            log.warning("tta=itta: the checkpoint was not trained with method=itta (no learned consistency loss); "
                        "falling back to the fixed consistency loss mean((z_aug - z)^2)")  # fmt: skip
        self.loss = self.loss.to(self.device).requires_grad_(False)
        self.optimizer = self.optimizer_factory(self.mapping.parameters())
        self.rng = np.random.default_rng(self.seed)

    def state(self) -> dict:
        """Mapping parameters, optimiser state and the MixStyle generator's state."""
        return {"mapping": self.mapping.state_dict(), "optimizer": self.optimizer.state_dict(),
                "rng": self.rng.bit_generator.state}  # fmt: skip

    def load_state(self, state: dict) -> None:
        """Restore what :meth:`state` returned."""
        self.mapping.load_state_dict(state["mapping"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = state["rng"]

    def _mapped(self, i: int, h: torch.Tensor) -> torch.Tensor:
        return self.mapping[i](h)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """One step on the consistency loss through the mapped network, then the clean prediction."""
        where = int(self.rng.integers(0, 2))  # MixStyle after stage 1 or 2, as in training
        z = self.stages.forward(x, self._mapped)
        z_aug = self.stages.forward(x, lambda i, h: mixstyle(self._mapped(i, h), self.rng) if i == where else
                                    self._mapped(i, h))  # fmt: skip
        loss = self.ada_lr * self.loss(z_aug - z)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            return self.classifier(self.stages.forward(x, self._mapped))
