"""The test-time adaptation (TTA) interface shared by every method in :mod:`dgkit.tta`.

A TTA wraps a *copy* of a trained model (``backbone`` → features, ``classifier`` → logits), so the source model
stays untouched for the no-TTA baseline. It declares whether it needs gradients (``needs_grad``: evaluation
then runs with autograd enabled instead of ``torch.inference_mode``) and when its state returns to the source
state (``reset``): ``never`` (online over every test domain), ``per_domain`` (the default: nothing leaks from
one test domain to the next) or ``per_batch`` (episodic). :meth:`TestTimeAdapter.reset` restores the model's
state dict and the method's own state exactly as they were after :meth:`TestTimeAdapter.bind`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

RESET_POLICIES = ("never", "per_domain", "per_batch")


class TestTimeAdapter:
    """Base class: bind to a trained model, then :meth:`predict` test batches in stream order.

    Args:
        reset: ``never``, ``per_domain`` or ``per_batch`` (see the module docstring).
        batch_size: the test batch size (results depend on it; it is recorded with them).
    """

    __test__ = False  # not a pytest test class despite the name
    needs_grad: bool = False
    name: str = "tta"

    def __init__(self, reset: str = "per_domain", batch_size: int = 64) -> None:
        if reset not in RESET_POLICIES:
            raise ValueError(f"tta.reset={reset!r}; choose one of {', '.join(RESET_POLICIES)}")
        if batch_size < 1:
            raise ValueError(f"tta.batch_size={batch_size} must be >= 1")
        self.reset_policy = reset
        self.batch_size = int(batch_size)
        self.backbone: nn.Module | None = None
        self.classifier: nn.Module | None = None
        self._snapshot: dict | None = None

    # ---- life cycle -----------------------------------------------------------------------------------
    def bind(
        self, backbone: nn.Module, classifier: nn.Module, source: Iterable[tuple[torch.Tensor, torch.Tensor]] = ()
    ) -> TestTimeAdapter:
        """Adapt copies of ``backbone`` and ``classifier``; ``source`` yields labelled source batches for methods
        that keep source statistics (AdaNPC's memory). Records the state that :meth:`reset` restores."""
        self.backbone = copy.deepcopy(backbone).eval()
        self.classifier = copy.deepcopy(classifier).eval()
        for p in [*self.backbone.parameters(), *self.classifier.parameters()]:
            p.requires_grad_(False)
        self.setup(source)
        self._snapshot = {
            "backbone": copy.deepcopy(self.backbone.state_dict()),
            "classifier": copy.deepcopy(self.classifier.state_dict()),
            "state": copy.deepcopy(self.state()),
        }
        return self

    def bind_method(
        self, method: nn.Module, source: Iterable[tuple[torch.Tensor, torch.Tensor]] = ()
    ) -> TestTimeAdapter:
        """Bind to a trained :class:`~dgkit.methods.base.Method` (its ``backbone`` and ``classifier``); TTAs that
        need more of the method (DRM's heads, ITTA's learned loss) override this."""
        return self.bind(method.backbone, method.classifier, source)

    def reset(self) -> None:
        """Restore the state recorded at :meth:`bind` (model weights, buffers and the method's own state)."""
        if self._snapshot is None:
            raise RuntimeError("bind() the TTA to a model before reset()")
        self.backbone.load_state_dict(self._snapshot["backbone"])
        self.classifier.load_state_dict(self._snapshot["classifier"])
        self.load_state(copy.deepcopy(self._snapshot["state"]))

    # ---- what subclasses implement --------------------------------------------------------------------
    def setup(self, source: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Prepare the copied model (modes, trainable parameters, memories). Default: nothing."""

    def state(self) -> dict:
        """The method's own state beyond the model's state dict (memories, optimiser state)."""
        return {}

    def load_state(self, state: dict) -> None:
        """Restore what :meth:`state` returned."""

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores ``(B, C)`` for a test batch, adapting on it as the method does (argmax = prediction)."""
        return self.classifier(self.backbone(x))

    @property
    def device(self) -> torch.device:
        """The device of the bound model."""
        return next(self.backbone.parameters()).device


class NoAdaptation(TestTimeAdapter):
    """``tta=none``: the source model as trained (the baseline every TTA is compared with)."""

    name = "none"


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample Shannon entropy ``-Σ p log p`` of ``softmax(logits)`` (nats), shape ``(B,)``."""
    log_p = logits.log_softmax(dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)
