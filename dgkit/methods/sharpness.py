"""Sharpness-aware minimisation (Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
Generalization", ICLR 2021), as a reusable utility and as the ``sharpness`` objective.

SAM minimises ``max_{||ε||₂ ≤ ρ} L(θ + ε)`` with the first-order inner solution ``ε̂ = ρ g / ||g||₂``,
``g = ∇_θ L(θ)``, the norm taken over *all* trainable parameters jointly (one global norm, as
``dual_vector`` in google-research/sam). The update uses ``∇_θ L(θ + ε̂)`` (the second-order term is
dropped) and any base optimiser: 2 forward + 2 backward passes per step.

The utility (:func:`sharpness_epsilon`, :func:`perturbed`, :func:`frozen_running_stats`) is shared with
UDIM (:mod:`dgkit.methods.udim`) and any other two-pass objective:

- ε is computed from the loss gradient only, so the optimiser's weight decay never enters it;
- ``||g|| = 0`` is handled by a floor of ``1e-12`` on the norm (ε is then 0);
- parameters are restored by copying the saved θ back (exact), not by subtracting ε (which rounds);
- normalisation layers' running statistics are frozen in the second pass (``momentum = 0``, and
  ``num_batches_tracked`` restored), so only the first forward of a step updates them, as in ERM.

Mixed precision (``trainer.precision=bf16-mixed|16-mixed``): every backward goes through Lightning's
``manual_backward``, so under ``16-mixed`` both passes' gradients carry the grad scaler's factor; ε is invariant
to it (``g / ||g||``), and the one ``opt.step()`` per batch unscales, steps and updates the scaler once. A
non-finite first-pass gradient gives a NaN ε: θ is restored by copy, the second gradient is non-finite and the
scaler skips the step and lowers its scale (tests/test_fast_paths.py).

"SAM" means Segment Anything in dgkit; the objective is therefore called ``sharpness``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from dgkit.methods.base import Method
from dgkit.tasks import Task

Batch = dict[str, tuple[torch.Tensor, torch.Tensor]]
GRAD_NORM_FLOOR = 1e-12


# ---- the reusable utility ------------------------------------------------------------------------------
def global_norm(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """L2 norm of all ``tensors`` seen as one flat vector (``None`` entries are skipped)."""
    present = [t for t in tensors if t is not None]
    if not present:
        raise ValueError("global_norm: every tensor is None (no parameter received a gradient)")
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in present]))


def sharpness_epsilon(grads: Sequence[torch.Tensor | None], rho: float) -> list[torch.Tensor | None]:
    """SAM's ascent step ``ε = ρ g / max(||g||₂, 1e-12)`` with one norm over every tensor of ``grads``.

    Args:
        grads: ``∇_θ L`` per parameter (``None`` for parameters without a gradient: they are not perturbed).
        rho: the neighbourhood radius ρ; ``||ε||₂ = ρ`` unless ``g = 0``.
    """
    scale = rho / global_norm(grads).clamp_min(GRAD_NORM_FLOOR)
    return [None if g is None else (g * scale).detach() for g in grads]


@contextmanager
def perturbed(params: Sequence[nn.Parameter], epsilon: Sequence[torch.Tensor | None]) -> Iterator[None]:
    """Move ``params`` to ``θ + ε`` in place for the body, then restore ``θ`` exactly (saved copies).

    Gradients accumulated in the body stay in ``p.grad``: they are the gradients *at* ``θ + ε``.
    """
    saved = []
    with torch.no_grad():
        for p, e in zip(params, epsilon, strict=True):
            if e is not None:
                saved.append((p, p.detach().clone()))
                p.add_(e)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, theta in saved:
                p.copy_(theta)


@contextmanager
def frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """Leave the running statistics of every BatchNorm-like layer of ``module`` as they were before the body.

    Forward passes in the body still normalise with batch statistics (train mode is untouched). The running
    statistics are frozen with ``momentum = 0`` (which also overrides ``momentum=None`` cumulative averages)
    and ``num_batches_tracked`` is restored on exit. Nothing saved for backward is written to, so the
    body's graph may be back-propagated after the context has closed (a save-and-copy-back of
    ``running_mean`` would trip autograd's in-place check: batch norm saves it for its backward).
    """
    layers = [m for m in module.modules() if isinstance(m, _NormBase) and m.track_running_stats]
    saved = [(m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        with torch.no_grad():
            for m, momentum, count in saved:
                m.momentum = momentum
                if count is not None:
                    m.num_batches_tracked.copy_(count)


def sharpness_gradient(
    module: nn.Module,
    params: Sequence[nn.Parameter],
    grads: Sequence[torch.Tensor | None],
    rho: float,
    loss_fn: Callable[[], torch.Tensor],
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
) -> torch.Tensor:
    """Replace ``p.grad`` by ``∇_θ L(θ + ε)``, ``ε`` from ``grads`` (the gradient at ``θ``); return ``L(θ + ε)``.

    Args:
        module: the model whose normalisation running statistics are frozen during the second pass.
        params: the trainable parameters (the ones the optimiser steps).
        grads: ``∇_θ L(θ)`` per parameter, aligned with ``params``.
        rho: the neighbourhood radius ρ.
        loss_fn: evaluates the loss at the current (perturbed) parameters.
        backward: how to back-propagate (Lightning's ``manual_backward`` in a LightningModule).
    """
    epsilon = sharpness_epsilon(grads, rho)  # before clearing .grad: `grads` may alias it
    for p in params:
        p.grad = None
    with perturbed(params, epsilon), frozen_running_stats(module):
        loss = loss_fn()
        backward(loss)
    return loss.detach()


# ---- the objective --------------------------------------------------------------------------------------
class Sharpness(Method):
    """SAM on the pooled source batch with the configured base optimiser (manual optimisation).

    Logs ``train/loss`` (``L(θ + ε)``, the objective minimised) and ``train/ce`` (``L(θ)``, comparable to ERM's
    loss). Under ``+augment=bss`` both passes see the batch plus its BSS copy (as ERM). A scheduler, if
    configured, is stepped once per training batch; exactly one optimiser step per batch keeps Lightning's
    ``global_step`` counting batches, so ``trainer.max_steps`` means training batches.
    Lightning's automatic gradient clipping is unavailable under manual optimisation (``gradient_clip_val``
    must stay null).

    Args:
        backbone, num_classes, domains, test_domains, optimizer, scheduler: as in
            :class:`~dgkit.methods.base.Method`.
        rho: neighbourhood radius ρ (> 0). Foret et al. use 0.05; UDIM's SAM baseline searches
            {0.01, 0.02, 0.05, 0.1}.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        domains: Sequence[str],
        test_domains: Sequence[str],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        rho: float = 0.05,
        task: Task | None = None,
    ) -> None:
        super().__init__(backbone, num_classes, domains, test_domains, optimizer, scheduler, task=task)
        if not rho > 0:
            raise ValueError(f"rho={rho}: the sharpness radius must be > 0 (e.g. 0.05); for rho=0 use method=erm")
        self.rho = float(rho)
        self.automatic_optimization = False

    # ---- training -------------------------------------------------------------------------------------
    def training_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``{"loss": CE}`` at the current parameters: the loss whose gradient defines ``ε``."""
        x, y = self.with_bss_copy(*self.concat(batch))
        return {"loss": self.task.loss(self(x), y)}

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        """One SAM update: gradient at ``θ``, ε, gradient at ``θ + ε`` (BN stats frozen), restore, step."""
        opt = self.optimizers()
        x, y = self.with_bss_copy(*self.concat(batch))  # (B or 2B, C, H, W): + BSS copy under +augment=bss
        params = self.trainable_parameters()
        opt.zero_grad()
        ce = self.task.loss(self(x), y)  # the step's only BN running-statistics update
        self.manual_backward(ce)
        sharp = self.sharpness_backward(x, y, [p.grad for p in params])
        opt.step()
        self.step_scheduler()
        self.log_losses({"loss": sharp, "ce": ce.detach()}, len(y))

    def sharpness_backward(
        self, x: torch.Tensor, y: torch.Tensor, grads: Sequence[torch.Tensor | None]
    ) -> torch.Tensor:
        """Set ``p.grad`` to ``∇_θ CE(θ + ε)`` on ``(x, y)``, ``ε`` from ``grads`` (at ``θ``); return ``CE(θ + ε)``."""
        return sharpness_gradient(
            self, self.trainable_parameters(), grads, self.rho, lambda: self.task.loss(self(x), y),
            self.manual_backward,
        )  # fmt: skip

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimiser steps (same order as :meth:`configure_optimizers`)."""
        return [p for p in self.parameters() if p.requires_grad]

    def step_scheduler(self) -> None:
        """Step the per-step scheduler, if any (manual optimisation does not do it for us)."""
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
