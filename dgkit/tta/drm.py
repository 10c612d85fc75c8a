"""DRM's test-time head ensemble and online model steering (Zhang et al., KDD 2023;
yfzhang114/AdaNPC ``adapt_algorithms.py::DRM``), for checkpoints trained with ``method=drm``.

Per test batch: every head's softmax ``p_i`` and per-sample entropy ``H_i``; ensemble weights ``∝ H_i^(-γ)``,
L1-normalised over the heads (``γ = -1``: per sample, the lowest-entropy head alone). Optional steering
(``steps`` > 0): pseudo-labels from the samples whose ensemble confidence ``max p`` is at least ``beta``, then
``steps`` Adam steps of ``Σ_i CE(h_i(z), ŷ)`` on the heads. Hand-written (no library ships DRM). Fixed relative
to the official code (``../shared/methods/dg_objectives_and_tta.md`` §4.5): the shared head is inside the
ensemble's sum as well as its normalisation, confidence is the ensemble's max probability (not a softmax of
probabilities), and ``steps`` stays what the config says (the official grid overwrote it with a counter).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from dgkit.tta.base import TestTimeAdapter


class DRMEnsemble(TestTimeAdapter):
    """``tta=drm``: entropy-weighted ensemble of a DRM checkpoint's heads, optionally steered online.

    Args:
        gamma: entropy exponent of the weights (``-1``: per-sample lowest-entropy head; ``0``: plain average).
        steps: online steering steps per batch on the heads (``0``: ensemble only, no gradients).
        beta: confidence (ensemble max probability) a sample needs to give a pseudo-label.
        optimizer: a partial taking the head parameters (default Adam, lr 1e-4).
        reset, batch_size: see :class:`~dgkit.tta.base.TestTimeAdapter`.
    """

    name = "drm"
    per_image_mechanism = "its ensemble weights heads by each image's prediction entropy over pooled features"

    def __init__(
        self,
        gamma: float = 1.0,
        steps: int = 0,
        beta: float = 0.75,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        reset: str = "per_domain",
        batch_size: int = 64,
    ) -> None:
        super().__init__(reset, batch_size)
        if steps < 0:
            raise ValueError(f"tta.steps={steps} must be >= 0 (0: ensemble only)")
        if gamma < 0 and gamma != -1:
            raise ValueError(f"tta.gamma={gamma} must be >= 0, or -1 for per-sample head selection")
        self.gamma, self.steps, self.beta = float(gamma), int(steps), float(beta)
        self.needs_grad = self.steps > 0
        self.optimizer_factory = optimizer or (lambda params: torch.optim.Adam(params, lr=1e-4))
        self.optimizer: torch.optim.Optimizer | None = None

    def model_parts(self, method: nn.Module) -> tuple[nn.Module, nn.Module]:
        """A DRM checkpoint's backbone and all heads (the domain heads, then the shared one)."""
        heads = getattr(method, "heads", None)
        if not isinstance(heads, nn.ModuleList):
            raise ValueError(
                f"tta=drm needs a checkpoint trained with method=drm (per-domain heads); this one is "
                f"{type(method).__name__}. Use tta=adanpc, t3a or tent on it, or train with method=drm."
            )
        return method.backbone, nn.ModuleList([*heads, method.classifier])

    def setup(self, source: Iterable) -> None:
        """Heads trainable when steering (the backbone stays frozen and in eval mode)."""
        if not isinstance(self.classifier, nn.ModuleList):
            raise ValueError("tta=drm: bind with bind_method(drm_method) (it needs every head)")
        if self.steps > 0:
            params = list(self.classifier.parameters())
            for p in params:
                p.requires_grad_(True)
            self.optimizer = self.optimizer_factory(params)

    def state(self) -> dict:
        """The optimiser state (heads are in the state dict)."""
        return {"optimizer": self.optimizer.state_dict()} if self.optimizer else {}

    def load_state(self, state: dict) -> None:
        """Restore the optimiser state."""
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])

    def ensemble(self, logits: torch.Tensor) -> torch.Tensor:
        """Ensemble probabilities ``(B, C)`` from every head's logits ``(H, B, C)``."""
        p = logits.softmax(-1)
        h = -(p * logits.log_softmax(-1)).sum(-1)  # (H, B) per-sample entropies
        if self.gamma == -1:
            return p.gather(0, h.argmin(0)[None, :, None].expand(1, *p.shape[1:]))[0]
        w = h.clamp_min(1e-8).pow(-self.gamma)  # (H, B)
        w = w / w.sum(0, keepdim=True)
        return (w.unsqueeze(-1) * p).sum(0)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Ensemble prediction (log-probabilities), then the steering steps on the confident samples."""
        z = self.backbone(x).detach()  # (B, D): the backbone is frozen
        with torch.no_grad():
            probs = self.ensemble(torch.stack([h(z) for h in self.classifier]))
        confidence, pseudo = probs.max(1)
        keep = confidence >= self.beta
        for _ in range(self.steps if keep.any() else 0):
            loss = sum(F.cross_entropy(h(z[keep]), pseudo[keep]) for h in self.classifier)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return probs.clamp_min(1e-12).log()
