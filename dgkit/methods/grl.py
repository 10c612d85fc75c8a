"""Gradient reversal and the schedules of domain-adversarial training (Ganin et al., JMLR 2016).

- :func:`grad_reverse`: the gradient reversal layer R_λ: identity forward, ``-λ · grad`` backward, so one
  backward pass trains a domain discriminator to *minimise* its loss and the features to *maximise* it.
- :func:`adaptation_factor`: the paper's ramp ``λ_p = λ_max · (2 / (1 + exp(-γ p)) - 1)``, 0 at p = 0 and
  close to ``λ_max`` at p = 1, which damps the noisy discriminator signal early in training.
- :func:`annealed_lr_factor`: the paper's learning-rate annealing ``μ_p / μ_0 = 1 / (1 + α p)^β``.
"""

from __future__ import annotations

import math

import torch


class GradientReversal(torch.autograd.Function):
    """Identity forward, ``-coeff · grad`` backward (no gradient for ``coeff``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, coeff: float) -> torch.Tensor:
        """Return a copy of ``x`` (a view would let in-place ops on the output reach the input)."""
        ctx.coeff = coeff
        return x.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Reverse and scale the incoming gradient."""
        return -ctx.coeff * grad_output, None


def grad_reverse(x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
    """Apply the gradient reversal layer R_coeff to ``x`` (any shape)."""
    return GradientReversal.apply(x, float(coeff))


def adaptation_factor(progress: float, lambda_max: float = 1.0, gamma: float = 10.0) -> float:
    """The adversarial weight at training progress ``progress`` in [0, 1]: ``λ_max (2 / (1 + e^{-γ p}) - 1)``."""
    p = min(max(progress, 0.0), 1.0)
    return lambda_max * (2.0 / (1.0 + math.exp(-gamma * p)) - 1.0)


def annealed_lr_factor(progress: float, alpha: float = 10.0, beta: float = 0.75) -> float:
    """The learning-rate multiplier at progress ``p`` in [0, 1]: ``1 / (1 + α p)^β`` (μ_0 is the optimiser's lr)."""
    p = min(max(progress, 0.0), 1.0)
    return 1.0 / (1.0 + alpha * p) ** beta
