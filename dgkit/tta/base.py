"""The test-time adaptation (TTA) interface shared by every method in :mod:`dgkit.tta`.

A TTA wraps a *copy* of a trained model (``backbone`` → features, ``classifier`` → logits), so the source model
stays untouched for the no-TTA baseline. It declares whether it needs gradients (``needs_grad``: evaluation
then runs with autograd enabled instead of ``torch.inference_mode``) and when its state returns to the source
state (``reset``): ``never`` (online over every test domain), ``per_domain`` (the default: nothing leaks from
one test domain to the next) or ``per_batch`` (episodic). :meth:`TestTimeAdapter.reset` restores the model's
state dict and the method's own state exactly as they were after :meth:`TestTimeAdapter.bind`.

The model is called through the run's :class:`~dgkit.tasks.base.Task` (``task.features`` then the head), so a TTA
that works on any output shape (``per_image_mechanism = None``: BN-adapt, Tent) also adapts a segmentation model,
predicting per pixel. The others declare what in them needs one prediction per image from pooled features, and
binding them to a task without per-image targets (``Task.per_image`` false) fails with that reason, naming the TTA.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn

from dgkit.tasks import Classification, Task

RESET_POLICIES = ("never", "per_domain", "per_batch")


class TestTimeAdapter:
    """Base class: bind to a trained model, then :meth:`predict` test batches in stream order.

    Args:
        reset: ``never``, ``per_domain`` or ``per_batch`` (see the module docstring).
        batch_size: the test batch size (results depend on it; it is recorded with them).

    Attributes:
        per_image_mechanism: what in the TTA needs one prediction per image from pooled features (T3A's class
            templates...); ``None``: nothing, it adapts any task's model (segmentation included). The default is
            conservative: a new TTA is refused on segmentation until it declares ``None``.
    """

    __test__ = False  # not a pytest test class despite the name
    needs_grad: bool = False
    name: str = "tta"
    per_image_mechanism: ClassVar[str | None] = "it was written for one class-score vector per image"

    def __init__(self, reset: str = "per_domain", batch_size: int = 64) -> None:
        if reset not in RESET_POLICIES:
            raise ValueError(f"tta.reset={reset!r}; choose one of {', '.join(RESET_POLICIES)}")
        if batch_size < 1:
            raise ValueError(f"tta.batch_size={batch_size} must be >= 1")
        self.reset_policy = reset
        self.batch_size = int(batch_size)
        self.backbone: nn.Module | None = None
        self.classifier: nn.Module | None = None
        self.task: Task = Classification()
        self._snapshot: dict | None = None

    # ---- life cycle -----------------------------------------------------------------------------------
    def check_task(self, task: Task) -> None:
        """Refuse a task without per-image targets when the TTA declares a :attr:`per_image_mechanism`."""
        if self.per_image_mechanism and not task.per_image:
            raise ValueError(
                f"tta={self.name} is not defined for task={task.name} ({task.target}): {self.per_image_mechanism}; "
                "use tta=tent or tta=bn_adapt, which adapt per-pixel predictions"
            )

    def bind(
        self,
        backbone: nn.Module,
        classifier: nn.Module,
        source: Iterable[tuple[torch.Tensor, torch.Tensor]] = (),
        task: Task | None = None,
    ) -> TestTimeAdapter:
        """Adapt copies of ``backbone`` and ``classifier`` (the head of ``task``, classification when omitted);
        ``source`` yields labelled source batches for methods that keep source statistics (AdaNPC's memory).
        Records the state that :meth:`reset` restores.

        Raises:
            ValueError: the TTA does not fit the task (see :attr:`per_image_mechanism`) or the model.
        """
        task = task or Classification()
        self.check_task(task)
        self.task = task
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
        """Bind to a trained :class:`~dgkit.methods.base.Method` and its task: the task is checked first (before
        anything else of the model), then :meth:`model_parts` gives what :meth:`bind` adapts."""
        self.check_task(method.task)
        backbone, classifier = self.model_parts(method)
        return self.bind(backbone, classifier, source, task=method.task)

    def model_parts(self, method: nn.Module) -> tuple[nn.Module, nn.Module]:
        """``(backbone, head)`` of ``method`` to adapt; TTAs that need more of the method (DRM's heads, ITTA's
        learned loss) override this."""
        return method.backbone, method.classifier

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The bound model's outputs: the head on the task's features (logits ``(B, C)``, or ``(B, C, H, W)``)."""
        return self.classifier(self.task.features(self.backbone, x))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The task's outputs for a test batch (class scores ``(B, C)``, or per pixel ``(B, C, H, W)``), adapting
        on it as the method does (``task.predict`` of them = the prediction)."""
        return self.forward(x)

    @property
    def device(self) -> torch.device:
        """The device of the bound model."""
        return next(self.backbone.parameters()).device


class NoAdaptation(TestTimeAdapter):
    """``tta=none``: the source model as trained (the baseline every TTA is compared with)."""

    name = "none"
    per_image_mechanism = None


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy ``-Σ p log p`` of ``softmax(logits)`` over the class dimension 1 (nats): per sample
    ``(B,)`` for logits ``(B, C)``, per pixel ``(B, H, W)`` for logits ``(B, C, H, W)``."""
    log_p = logits.log_softmax(dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)
