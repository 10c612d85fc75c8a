"""DANN: Domain-Adversarial Training of Neural Networks (Ganin et al., JMLR 2016), for multi-source DG.

A discriminator MLP reads the pooled features and predicts which *source domain* each sample came from
(multi-class, one class per entry of ``source_domains``); the features are trained to fool it. Two variants:

- ``variant="grl"`` (the paper): one optimiser, automatic optimisation. The discriminator sits behind a
  gradient reversal layer, so minimising ``CE + disc`` trains the discriminator and pushes the features the
  other way with weight ``λ_p = λ_max (2 / (1 + e^{-γ p}) - 1)``, p = ``global_step / max_steps``.
  Optional learning-rate annealing ``μ_0 / (1 + α p)^β`` (``lr_anneal``), as a per-step ``LambdaLR``.
- ``variant="alternating"`` (DomainBed's ``DANN``, Gulrajani & Lopez-Paz, ICLR 2021): no reversal layer; the
  discriminator and the generator (backbone + classifier) are stepped in turn by their own Adam optimisers
  (betas ``(beta1, 0.9)``), with a constant λ and an optional gradient penalty on the discriminator's input.
  Manual optimisation; exactly one optimiser steps per training batch, so Lightning's ``global_step`` (which
  counts optimiser steps) still counts batches and ``trainer.max_steps`` means training batches, as in DomainBed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dgkit.methods.base import Method
from dgkit.methods.discriminator import DomainDiscriminator
from dgkit.methods.grl import adaptation_factor, annealed_lr_factor, grad_reverse
from dgkit.tasks import Task

VARIANTS = ("grl", "alternating")
Batch = dict[str, tuple[torch.Tensor, torch.Tensor]]


class DANN(Method):
    """Domain-adversarial training over the source domains (see the module docstring for the two variants).

    Args:
        backbone, num_classes, domains, test_domains: as in :class:`~dgkit.methods.base.Method`.
        optimizer: ``partial`` taking the parameters (``grl`` only; ``alternating`` builds DomainBed's two Adams).
        scheduler: optional per-step scheduler ``partial`` (``grl`` only; exclusive with ``lr_anneal``).
        variant: ``"grl"`` (Ganin et al.) or ``"alternating"`` (DomainBed).
        lambda_max: adversarial weight: the ceiling of the ramp for ``grl``, DomainBed's constant ``lambda``
            for ``alternating``.
        gamma: steepness γ of the ramp (``grl``).
        lr_anneal: anneal the learning rate as ``lr / (1 + anneal_alpha p)^anneal_beta`` (``grl``).
        anneal_alpha, anneal_beta: α and β of the annealing.
        mlp_width, mlp_depth, mlp_dropout: the discriminator MLP (DomainBed's ``networks.MLP``).
        d_steps_per_g: discriminator steps per generator step (``alternating``).
        grad_penalty: weight of ``mean_i ||∂CE_sum/∂z_i||²`` added to the discriminator loss (``alternating``).
        beta1: Adam β1 of both optimisers (``alternating``).
        lr_d, lr_g: learning rates of the discriminator and generator optimisers (``alternating``).
        weight_decay_d, weight_decay_g: their weight decays (``alternating``).
    """

    per_image_mechanism = (
        "its domain discriminator reads pooled per-image features, and its classifier is applied to them"
    )

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        domains: Sequence[str],
        test_domains: Sequence[str],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        variant: str = "grl",
        lambda_max: float = 1.0,
        gamma: float = 10.0,
        lr_anneal: bool = False,
        anneal_alpha: float = 10.0,
        anneal_beta: float = 0.75,
        mlp_width: int = 256,
        mlp_depth: int = 3,
        mlp_dropout: float = 0.0,
        d_steps_per_g: int = 1,
        grad_penalty: float = 0.0,
        beta1: float = 0.5,
        lr_d: float = 5e-5,
        lr_g: float = 5e-5,
        weight_decay_d: float = 0.0,
        weight_decay_g: float = 0.0,
        task: Task | None = None,
    ) -> None:
        super().__init__(backbone, num_classes, domains, test_domains, optimizer, scheduler, task=task)
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r}; choose one of {', '.join(VARIANTS)}")
        if len(self.source_domains) < 2:
            raise ValueError(
                f"DANN needs at least 2 source domains to learn domain labels, but only {self.source_domains} "
                f"remain after holding out test_domains={self.test_domains} of domains={self.domains}; "
                "hold out fewer domains (data.test_domains) or use method=erm"
            )
        _check_non_negative(
            lambda_max=lambda_max, gamma=gamma, anneal_alpha=anneal_alpha, anneal_beta=anneal_beta,
            grad_penalty=grad_penalty, weight_decay_d=weight_decay_d, weight_decay_g=weight_decay_g,
        )  # fmt: skip
        if d_steps_per_g < 1:
            raise ValueError(f"d_steps_per_g={d_steps_per_g}: must be at least 1")
        if lr_d <= 0 or lr_g <= 0:
            raise ValueError(f"lr_d={lr_d}, lr_g={lr_g}: learning rates must be positive")
        if not 0.0 <= beta1 < 1.0:
            raise ValueError(f"beta1={beta1}: must be in [0, 1)")
        # Options that would silently do nothing in the chosen variant are errors (a sweep over them would
        # train identical models).
        if variant == "alternating" and (lr_anneal or scheduler is not None):
            raise ValueError("lr_anneal / scheduler apply to variant=grl only (DomainBed uses a constant lr)")
        if variant == "grl" and (grad_penalty > 0 or d_steps_per_g != 1):
            raise ValueError("grad_penalty and d_steps_per_g apply to variant=alternating only")
        if lr_anneal and scheduler is not None:
            raise ValueError("lr_anneal=true and a scheduler are exclusive: choose one")
        self.variant = variant
        self.lambda_max = lambda_max
        self.gamma = gamma
        self.lr_anneal = lr_anneal
        self.anneal_alpha = anneal_alpha
        self.anneal_beta = anneal_beta
        self.d_steps_per_g = d_steps_per_g
        self.grad_penalty = grad_penalty
        self.adam = {"d": (lr_d, weight_decay_d), "g": (lr_g, weight_decay_g), "betas": (beta1, 0.9)}
        self.discriminator = DomainDiscriminator(
            backbone.num_features, len(self.source_domains), mlp_width, mlp_depth, mlp_dropout
        )
        self.automatic_optimization = variant == "grl"

    # ---- training -------------------------------------------------------------------------------------
    def training_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The objective minimised by the features and the classifier.

        ``grl``: ``{"loss": CE + disc, "ce", "disc", "lambda", "disc_acc"}``, the reversal layer turning ``disc``
        into ``-λ disc`` for the features. ``alternating``: DomainBed's generator loss ``CE - λ disc``.
        """
        x, y = self.concat(batch)  # (B, C, H, W), (B,)
        x, y, domain = self.with_bss_copy(x, y, self.domain_labels(batch))  # B or 2B rows (+augment=bss)
        z = self.backbone(x)  # (B, D)
        ce = self.task.loss(self.classifier(z), y)
        if self.variant == "grl":
            lam = adaptation_factor(self.progress(), self.lambda_max, self.gamma)
            disc, acc = self._discriminate(grad_reverse(z, lam), domain)
            return {"loss": ce + disc, "ce": ce, "disc": disc, "lambda": z.new_tensor(lam), "disc_acc": acc}
        disc, acc = self._discriminate(z, domain)
        return {"loss": ce - self.lambda_max * disc, "ce": ce, "disc": disc, "disc_acc": acc}

    def step_budget_dependence(self) -> list[str]:
        """``grl``: the λ ramp and ``lr_anneal`` follow ``p = step / max_steps``."""
        reasons = super().step_budget_dependence()
        if self.variant == "grl" and self.gamma > 0:
            reasons.append("DANN's λ ramp (p = step / max_steps)")
        if self.lr_anneal:
            reasons.append("DANN's lr_anneal (p = step / max_steps)")
        return reasons

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor | None:
        """``grl``: the base step. ``alternating``: one discriminator *or* one generator update (DomainBed)."""
        if self.automatic_optimization:
            return super().training_step(batch, batch_idx)
        opt_d, opt_g = self.optimizers()
        # DomainBed's update_count is 1 on the first update; one optimiser steps per batch, so global_step
        # counts batches (and survives a resume).
        update_count = self.global_step + 1
        if update_count % (1 + self.d_steps_per_g) < self.d_steps_per_g:
            losses = self._discriminator_losses(batch)
            opt_d.zero_grad()
            self.manual_backward(losses["disc"])
            opt_d.step()
        else:
            with self.toggled_optimizer(opt_g):  # discriminator weights frozen: no gradients computed for them
                losses = self.training_losses(batch)
                opt_g.zero_grad()
                self.manual_backward(losses["loss"])
                opt_g.step()
        self.log_losses(losses, sum(len(y) for _, y in batch.values()))
        return None

    def _discriminator_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The discriminator step: ``disc`` with a graph to the discriminator only (nothing else steps here, and
        its gradients do not depend on the features' graph). ``loss`` and ``ce`` are the generator's objective
        at the current weights, without a graph, so every step logs the same keys (a key not logged at a step
        would show its stale value from the previous step in the logs)."""
        x, y, domain = self.with_bss_copy(*self.concat(batch), self.domain_labels(batch))
        with torch.no_grad():
            z = self.backbone(x)  # (B, D)
            ce = self.task.loss(self.classifier(z), y)
        disc, acc = self._discriminate(z.requires_grad_(self.grad_penalty > 0), domain)
        return {"loss": ce - self.lambda_max * disc.detach(), "ce": ce, "disc": disc, "disc_acc": acc}

    def _discriminate(self, z: torch.Tensor, domain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Discriminator loss (CE, plus DomainBed's gradient penalty when set) and accuracy on features ``(B, D)``."""
        logits = self.discriminator(z)  # (B, num_source_domains)
        loss = F.cross_entropy(logits, domain)
        if self.grad_penalty > 0:
            # DomainBed: penalty = mean_i ||∂ CE_sum / ∂ z_i||². It is part of `disc`, so the generator step
            # (CE - λ disc) pushes it up, DomainBed's quirk, kept for comparable numbers.
            (grad,) = torch.autograd.grad(F.cross_entropy(logits, domain, reduction="sum"), [z], create_graph=True)
            loss = loss + self.grad_penalty * grad.pow(2).sum(dim=1).mean()
        acc = (logits.argmax(-1) == domain).float().mean().detach()
        return loss, acc

    def domain_labels(self, batch: Batch) -> torch.Tensor:
        """Index in ``source_domains`` of every sample of :meth:`concat` ``(batch)``, shape ``(B,)``."""
        labels = [torch.full_like(y, self.source_domains.index(name)) for name, (_, y) in batch.items()]
        return torch.cat(labels)

    def progress(self) -> float:
        """Training progress p in [0, 1] from the global step (0 without a trainer, 1 without a finite horizon)."""
        if self._trainer is None:
            return 0.0
        total = self._horizon()
        return min(self.trainer.global_step / total, 1.0) if math.isfinite(total) else 1.0

    def _horizon(self) -> float:
        """Total training steps: ``max_steps``, else Lightning's estimate (``inf`` when unbounded)."""
        if self.trainer.max_steps > 0:
            return float(self.trainer.max_steps)
        total = float(self.trainer.estimated_stepping_batches)
        return total if total > 0 else math.inf

    # ---- optimisation ---------------------------------------------------------------------------------
    def configure_optimizers(self):
        """``grl``: the configured optimiser (+ scheduler or annealing). ``alternating``: ``[disc_opt, gen_opt]``."""
        if self.variant == "grl":
            if not self.lr_anneal:
                return super().configure_optimizers()
            optimizer = self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
            total, alpha, beta = self._horizon(), self.anneal_alpha, self.anneal_beta
            # LambdaLR counts optimiser steps, which is the global step here.
            schedule = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: annealed_lr_factor(step / total if math.isfinite(total) else 1.0, alpha, beta)
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
        disc = [p for p in self.discriminator.parameters() if p.requires_grad]
        gen = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("discriminator.")]
        (lr_d, wd_d), (lr_g, wd_g), betas = self.adam["d"], self.adam["g"], self.adam["betas"]
        return [
            torch.optim.Adam(disc, lr=lr_d, weight_decay=wd_d, betas=betas),
            torch.optim.Adam(gen, lr=lr_g, weight_decay=wd_g, betas=betas),
        ]


def _check_non_negative(**values: float) -> None:
    """Raise ``ValueError`` naming the first negative value."""
    for key, value in values.items():
        if value < 0:
            raise ValueError(f"{key}={value}: must be >= 0")
