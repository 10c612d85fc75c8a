"""UDIM: Unknown Domain Inconsistency Minimization (Shin et al., "Unknown Domain Inconsistency Minimization
for Domain Generalization", ICLR 2024, arXiv 2403.07329), after the official ``IADA_DG_FINAL`` step.

SAM on the sources, plus a penalty that makes the loss landscape of *crafted unknown domains* (source
instances perturbed inside an input ball of radius ``rho_x``) agree with the source landscape. Per step,
after ``warmup_steps`` plain SAM steps (:class:`~dgkit.methods.sharpness.Sharpness`):

1. on the pooled source batch ``x``: ``ℓ = CE(f_θ(x), y)``, ``g = ∇_θ ℓ`` (with a graph), SAM's
   ``ε = ρ g / ||g||``, and ``∇_x Φ`` of ``Φ = ℓ + ρ ||g||₂`` by double back-propagation;
2. ``x̃ = x + rho_x · normalize(∇_x Φ)`` (see ``perturb_norm``);
3. the SAM gradient on the sources: ``∇_θ CE(θ + ε)`` (BN running statistics frozen; ``θ + ε`` is built out
   of place with ``torch.func.functional_call``, so step 1's graph stays usable in step 4);
4. the inconsistency at ``θ`` on ``cat(x, x̃)``: per-sample gradients of each sample's CE with respect to
   the classifier head (``torch.func``: ``vmap`` over ``grad``), and per source domain
   ``penalty_var`` (Fishr's variance matching between source and perturbed samples, the perturbed ones
   centred on the *source* mean as in the official code) + ``penalty_norm`` (mean squared per-sample
   gradient norm of the perturbed samples divided by the parameter's size, summed over weight and bias);
5. ``grad = g_SAM + lambda_inc · ∇_θ inconsistency``, then one step of the configured optimiser.

Cost (``input_gradient=exact``): 3 forward passes (the third on the perturbed half only when the source
half's features are shared, see below), 3 backward passes and 2 double backward passes (the first through
the whole network, the second through the head only). Counting passes suggests about 2x SAM; measured on the
lite small CNN it is about 3.5x SAM, because the double backward through convolutions and GroupNorm costs
3-4 ERM steps by itself (``scripts/bench_udim.py``, ``docs/benchmarks.md`` "UDIM's step cost").

``input_gradient=finite_difference`` replaces step 1's double backward by a finite-difference Hessian-vector
product. Since ``∇_g ||g||₂ = ĝ = g / ||g||``, ``∇_x ||g|| = ∇_x (∇_θ ℓ · ĝ) = (∂/∂r) ∇_x ℓ(θ + r ĝ)`` at
``r = 0`` (``ĝ`` held fixed; mixed partials commute), so with a step ``r`` (``fd_step``)::

    ∇_x Φ ≈ ∇_x ℓ(θ) + (ρ / r) · [∇_x ℓ(θ + r ĝ) - ∇_x ℓ(θ)]        (error O(ρ r))

With ``fd_step=null`` (default), ``r = ρ`` and the formula collapses to ``∇_x ℓ(θ + ε)``, SAM's own
perturbed loss, whose input gradient the SAM pass of step 3 yields at almost no cost: step 1 becomes a
plain forward/backward (SAM's first pass) and the step costs about 2x SAM. This is the gradient of the
loss that ``Φ`` approximates to first order (``ℓ(θ + ε̂) ≈ ℓ + ρ ||g||``), i.e. a different ascent
direction from the exact step's, not a rounding of it; ``fd_step`` > 0 costs one more forward and input
backward at ``θ + r ĝ`` and tends to the exact direction as ``r → 0``.

Shared source features: when the backbone has no layer that couples samples or draws randomness in training
mode (batch-statistics normalisation, active dropout), the source rows of step 4's features equal step 1's
(the backbone is per-sample and deterministic, and ``θ`` is the same), so step 4 forwards only ``x̃`` and
back-propagates the source half through step 1's graph: one forward of ``B`` samples fewer, same numbers.

``perturb_norm``:

- ``batch_dim`` (the official code, ``F.normalize(grad, dim=0)``): the gradient is normalised across the
  *batch* at every ``(c, h, w)`` position, so ``||x̃[:, c, h, w] - x[:, c, h, w]||₂ = rho_x`` at each
  position and the per-pixel RMS step is ``rho_x / √B`` (with ``rho_x = 10``, ``B = 48``: 1.4 units of the
  normalised input, a very strong perturbation that depends on the batch size and couples samples);
- ``per_sample`` (the paper's ``x + ρ_x ∇/||∇||``): each sample's gradient is normalised over its own
  ``(C, H, W)``, so ``||x̃_i - x_i||₂ = rho_x``; the same ``rho_x`` is about ``√(CHW / B)`` times weaker
  (56x for 3x224² images and ``B = 48``).

Choices where the notes or the official code are ambiguous (or buggy):

- warm-up: the official run trains SAM for ``n_steps // 5`` steps, reloads the checkpoint with the best
  source-validation accuracy (and its optimiser state), then starts UDIM. Here UDIM simply continues from
  the current parameters at ``warmup_steps`` (no reload: model selection stays the run's business);
  ``warmup_steps=null`` means ``int(warmup_fraction · trainer.max_steps)`` (0.2: the official 1/5).
- one forward of ``cat(x, x̃)`` over all source domains gives the features (of ``x̃`` only when the source
  features are shared, above); the penalty is then computed
  on each source domain's rows (``per_domain_inconsistency=true``, the official multi-source mode) and
  summed, or on the pooled batch (``false``: what the official scripts actually ran, their ``--is_single``
  flag being parsed as True from any string). Batch-norm layers see the 2B-sample batch in that forward.
- Fishr's variance distance is the MSE over the *concatenation* of weight and bias (Fishr's
  ``l2_between_dicts``), ``½ Σ_{d ∈ {S, T}} MSE(v_d, (v_S + v_T) / 2)``, variances with ``1/n`` (biased).
- BN running statistics are updated by the first forward only (steps 3-4 are frozen, so perturbed
  samples never enter them); evaluation uses them as usual. The official code replaces every BN by a
  batch-statistics one, so its evaluation depends on the test batch size: not ported. Neither are its
  string-to-bool ``--is_single`` flag nor its debug image writes.
- ``x̃`` is not clamped to the valid image range (the official code does not either).
- step 1's forward runs with PyTorch's math attention kernel: the fused scaled-dot-product kernels have no
  double backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.profiler import record_function

from dgkit.methods.sharpness import (
    GRAD_NORM_FLOOR,
    Batch,
    Sharpness,
    frozen_running_stats,
    global_norm,
    sharpness_epsilon,
)
from dgkit.tasks import Task

PERTURB_NORMS = ("per_sample", "batch_dim")
INPUT_GRADIENTS = ("exact", "finite_difference")


def per_sample_and_deterministic(module: nn.Module) -> bool:
    """Whether ``module``'s outputs for a sample depend on that sample alone and on no random draw, in its
    current mode: no batch-statistics normalisation in training mode (``_BatchNorm``) and no active dropout
    (``torch.nn`` dropouts, timm's ``DropPath``/``DropBlock`` with a positive rate)."""
    for m in module.modules():
        if isinstance(m, _BatchNorm) and (m.training or not m.track_running_stats):
            return False
        if m.training and isinstance(m, _DropoutNd) and m.p > 0:
            return False
        if m.training and type(m).__name__.startswith("Drop") and float(getattr(m, "drop_prob", 0) or 0) > 0:
            return False
    return True


def perturb_instances(x: torch.Tensor, direction: torch.Tensor, rho_x: float, norm: str) -> torch.Tensor:
    """``x + rho_x · normalize(direction)`` (detached), normalised ``per_sample`` or over the batch (``batch_dim``).

    Args:
        x: inputs ``(B, ...)``.
        direction: the ascent direction, same shape (``∇_x Φ``).
        rho_x: the radius of the input ball.
        norm: ``per_sample`` (L2 over all but the first dim) or ``batch_dim`` (L2 over dim 0, the official code).
    """
    if norm == "per_sample":
        scale = torch.linalg.vector_norm(direction.flatten(1), dim=1).clamp_min(GRAD_NORM_FLOOR)  # (B,)
        unit = direction / scale.view(-1, *[1] * (direction.dim() - 1))
    elif norm == "batch_dim":
        unit = F.normalize(direction, dim=0, eps=GRAD_NORM_FLOOR)  # unit norm across the batch at each position
    else:
        raise ValueError(f"perturb_norm={norm!r}; choose one of {', '.join(PERTURB_NORMS)}")
    return (x + rho_x * unit).detach()


def per_sample_head_grads(head: nn.Module, z: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of each sample's CE with respect to every parameter of ``head``: ``{name: (N, *shape)}``.

    ``torch.func`` (``vmap`` over ``grad``), differentiable with respect to ``z`` and the head's parameters
    (the outer autograd graph is kept), so a penalty on them back-propagates through the whole network.

    Args:
        head: the classifier (any module mapping ``(N, D)`` features to ``(N, K)`` logits).
        z: features ``(N, D)``.
        y: labels ``(N,)``.
    """
    params = dict(head.named_parameters())

    def sample_loss(p: dict[str, torch.Tensor], zi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(head, p, (zi.unsqueeze(0),)), yi.unsqueeze(0))

    return vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, z, y)


def inconsistency_penalty(
    source: dict[str, torch.Tensor], perturbed: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """UDIM's ``(penalty_var, penalty_norm)`` from per-sample head gradients ``{name: (n, *shape)}``.

    ``penalty_var = ½ Σ_{d∈{S,T}} MSE(v_d, (v_S + v_T)/2)`` with ``v_S = mean_i (g_i^S - ḡ^S)²`` and
    ``v_T = mean_i (g_i^T - ḡ^S)²`` over the concatenated parameters; ``penalty_norm = Σ_params
    mean_{i∈T} ||g_i^T||² / numel(param)``.
    """
    g_s = torch.cat([g.flatten(1) for g in source.values()], dim=1)  # (n_S, P)
    g_t = torch.cat([g.flatten(1) for g in perturbed.values()], dim=1)  # (n_T, P)
    mean_s = g_s.mean(dim=0)  # (P,)
    v_s = (g_s - mean_s).pow(2).mean(dim=0)  # (P,)
    v_t = (g_t - mean_s).pow(2).mean(dim=0)  # (P,) centred on the source mean (official)
    middle = (v_s + v_t) / 2
    penalty_var = 0.5 * (F.mse_loss(v_s, middle) + F.mse_loss(v_t, middle))
    penalty_norm = sum(g.flatten(1).pow(2).sum(dim=1).mean() / g[0].numel() for g in perturbed.values())
    return penalty_var, penalty_norm


class UDIM(Sharpness):
    """SAM warm-up, then SAM + ``lambda_inc`` · the unknown-domain inconsistency (see the module docstring).

    Args:
        backbone, num_classes, domains, test_domains, optimizer, scheduler: as in
            :class:`~dgkit.methods.base.Method`.
        rho: SAM's parameter radius ρ (> 0; official 0.05), also in ``Φ = ℓ + ρ ||∇_θ ℓ||``.
        rho_x: the input radius ρ_x (> 0; official ``syn_lr`` = 10 with ``batch_dim``).
        lambda_inc: weight of the inconsistency gradient (>= 0; official ``worst_weight`` = 1).
        perturb_norm: ``batch_dim`` (official) or ``per_sample`` (the paper's formula).
        warmup_steps: plain SAM steps before UDIM starts (>= 0); ``None``: ``warmup_fraction`` of ``max_steps``.
        warmup_fraction: used when ``warmup_steps`` is ``None``; in [0, 1] (official 1/5).
        per_domain_inconsistency: penalty per source domain and summed (true) or on the pooled batch (false).
        input_gradient: ``exact`` (double backward, the official maths) or ``finite_difference`` (a
            finite-difference Hessian-vector product: about 2x SAM's cost instead of 3.5x; module docstring).
        fd_step: the finite-difference step ``r`` (> 0); ``None``: ``r = rho``, read off SAM's own pass.
    """

    per_image_mechanism = "its perturbation follows per-sample head gradients of pooled per-image features"

    double_backward: ClassVar[bool] = True  # torch.compile cannot run it (trainer.compile is refused)

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        domains: Sequence[str],
        test_domains: Sequence[str],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        rho: float = 0.05,
        rho_x: float = 10.0,
        lambda_inc: float = 1.0,
        perturb_norm: str = "batch_dim",
        warmup_steps: int | None = None,
        warmup_fraction: float = 0.2,
        per_domain_inconsistency: bool = True,
        input_gradient: str = "exact",
        fd_step: float | None = None,
        task: Task | None = None,
    ) -> None:
        super().__init__(backbone, num_classes, domains, test_domains, optimizer, scheduler, rho, task=task)
        if not rho_x > 0:
            raise ValueError(f"rho_x={rho_x}: the input perturbation radius must be > 0 (official: 10)")
        if not lambda_inc >= 0:
            raise ValueError(f"lambda_inc={lambda_inc}: the inconsistency weight must be >= 0 (official: 1)")
        if perturb_norm not in PERTURB_NORMS:
            raise ValueError(f"perturb_norm={perturb_norm!r}; choose one of {', '.join(PERTURB_NORMS)}")
        if warmup_steps is not None and warmup_steps < 0:
            raise ValueError(f"warmup_steps={warmup_steps}: must be >= 0 (or null to use warmup_fraction)")
        if not 0.0 <= warmup_fraction <= 1.0:
            raise ValueError(f"warmup_fraction={warmup_fraction}: must be in [0, 1] (official: 0.2)")
        if input_gradient not in INPUT_GRADIENTS:
            raise ValueError(f"input_gradient={input_gradient!r}; choose one of {', '.join(INPUT_GRADIENTS)}")
        if fd_step is not None and not fd_step > 0:
            raise ValueError(f"fd_step={fd_step}: the finite-difference step must be > 0 (or null: rho)")
        if fd_step is not None and input_gradient != "finite_difference":
            raise ValueError(f"fd_step={fd_step} is only used with input_gradient=finite_difference")
        self.input_gradient = input_gradient
        self.fd_step = None if fd_step is None else float(fd_step)
        self.rho_x = float(rho_x)
        self.lambda_inc = float(lambda_inc)
        self.perturb_norm = perturb_norm
        self.warmup_steps = warmup_steps
        self.warmup_fraction = float(warmup_fraction)
        self.per_domain_inconsistency = bool(per_domain_inconsistency)

    # ---- training -------------------------------------------------------------------------------------
    def step_budget_dependence(self) -> list[str]:
        """With ``warmup_steps=null`` the SAM warm-up is a fraction of ``max_steps``."""
        reasons = super().step_budget_dependence()
        if self.warmup_steps is None:
            reasons.append("UDIM's warm-up (warmup_fraction × max_steps; set method.warmup_steps to fix it)")
        return reasons

    def on_fit_start(self) -> None:
        """Refuse ``+augment=bss`` (attached after construction): a BSS copy mixes the source domains, so it
        has no place in the per-domain source-vs-perturbed penalty; silently dropping it would mislead."""
        if self.bss is not None:
            raise ValueError("augment.bss is not supported by method=udim: drop +augment=bss (or use method=sharpness)")

    def warmup_total(self) -> int:
        """The number of SAM warm-up steps (``warmup_fraction`` of the trainer's ``max_steps`` if unset)."""
        if self.warmup_steps is not None:
            return int(self.warmup_steps)
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        return int(self.warmup_fraction * total)

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        """A SAM step during warm-up, then the UDIM step (module docstring, steps 1-5)."""
        if self.global_step < self.warmup_total():
            return super().training_step(batch, batch_idx)
        opt = self.optimizers()
        x, y = self.concat(batch)  # (B, C, H, W), (B,)
        opt.zero_grad()
        share = per_sample_and_deterministic(self.backbone)  # step 4 reuses step 1's source features
        if self.input_gradient == "exact":
            with record_function("udim/1_instance_gradient"):
                ce, grads, x_grad, z_source = self.instance_gradient(x, y, keep_features=share)  # 1.
            with record_function("udim/3_sam_gradient"):
                sharp = self.sam_gradient(x, y, grads)  # 3. p.grad = g_SAM
        else:
            with record_function("udim/1_source_gradient"):
                ce, grads, x_grad0, z_source = self.source_gradient(x, y, share, self.fd_step is not None)
            with record_function("udim/3_sam_gradient"):
                x_sam = x.detach().requires_grad_(True)
                sharp = self.sam_gradient(x_sam, y, grads)  # 3. p.grad = g_SAM, x_sam.grad = ∇_x ℓ(θ + ε)
            if self.fd_step is None:  # r = ρ: ∇_x ℓ(θ) + (ρ / ρ) (∇_x ℓ(θ + ε) - ∇_x ℓ(θ))
                x_grad = x_sam.grad
            else:
                with record_function("udim/1_fd_input_gradient"):
                    x_step = self.input_gradient_at(x, y, grads, self.fd_step)
                x_grad = x_grad0 + (self.rho / self.fd_step) * (x_step - x_grad0)
        x_adv = perturb_instances(x, x_grad, self.rho_x, self.perturb_norm)  # 2. (B, C, H, W)
        sizes = [len(b[1]) for b in batch.values()] if self.per_domain_inconsistency else [len(y)]
        with record_function("udim/4_inconsistency"):
            penalty_var, penalty_norm = self.inconsistency(x, x_adv, y, sizes, z_source)  # 4.
            inconsistency = penalty_var + penalty_norm
            self.manual_backward(self.lambda_inc * inconsistency, inputs=self.trainable_parameters())  # 5.
        opt.step()  # p.grad = g_SAM + λ ∇_θ inconsistency
        self.step_scheduler()
        losses = {
            "loss": sharp + self.lambda_inc * inconsistency.detach(), "ce": ce, "sharp": sharp,
            "inconsistency": inconsistency, "penalty_var": penalty_var, "penalty_norm": penalty_norm,
            "perturbation_rms": (x_adv - x).pow(2).mean().sqrt(),
        }  # fmt: skip
        self.log_losses(losses, len(y))
        return None

    def instance_gradient(
        self, x: torch.Tensor, y: torch.Tensor, keep_features: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor | None], torch.Tensor, torch.Tensor | None]:
        """Step 1: ``(ℓ, ∇_θ ℓ, ∇_x (ℓ + ρ ||∇_θ ℓ||₂), z)`` at the current parameters (the first three detached).

        This forward is the step's only update of BN running statistics (as in ERM and SAM). With
        ``keep_features`` its graph is kept and ``z`` is the features of ``x`` (differentiable with respect to
        ``θ``) for step 4; otherwise ``z`` is ``None``.
        """
        params = self.trainable_parameters()
        x_in = x.detach().requires_grad_(True)
        with sdpa_kernel(SDPBackend.MATH):  # fused attention kernels have no double backward
            z = self.task.features(self.backbone, x_in)
            loss = self.task.loss(self.classifier(z), y)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        phi = loss + self.rho * global_norm(grads)
        (x_grad,) = torch.autograd.grad(phi, x_in, retain_graph=keep_features)  # (B, C, H, W)
        grads = [None if g is None else g.detach() for g in grads]
        return loss.detach(), grads, x_grad, z if keep_features else None

    def source_gradient(
        self, x: torch.Tensor, y: torch.Tensor, keep_features: bool = False, input_grad: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor | None], torch.Tensor | None, torch.Tensor | None]:
        """Step 1 of ``input_gradient=finite_difference``: ``(ℓ, ∇_θ ℓ, ∇_x ℓ or None, z or None)`` at ``θ``.

        One forward and one first-order backward (SAM's first pass); the step's only BN running-statistics
        update. ``input_grad``: also ``∇_x ℓ(θ)`` (needed when ``fd_step`` is not ρ); ``keep_features``: keep
        the graph and return the features of ``x`` for step 4.
        """
        params = self.trainable_parameters()
        x_in = x.detach().requires_grad_(input_grad)
        z = self.task.features(self.backbone, x_in)
        loss = self.task.loss(self.classifier(z), y)
        grads = torch.autograd.grad(loss, [*params, x_in] if input_grad else params, retain_graph=keep_features,
                                    allow_unused=True)  # fmt: skip
        x_grad = grads[-1] if input_grad else None
        grads = list(grads[: len(params)])
        return loss.detach(), grads, x_grad, z if keep_features else None

    def input_gradient_at(
        self, x: torch.Tensor, y: torch.Tensor, grads: Sequence[torch.Tensor | None], step: float
    ) -> torch.Tensor:
        """``∇_x ℓ(θ + step · ĝ)``, ``ĝ = g / ||g||`` from ``grads`` (BN running statistics frozen)."""
        x_in = x.detach().requires_grad_(True)
        with frozen_running_stats(self):
            loss = self.loss_at(x_in, y, sharpness_epsilon(grads, step))
        (x_grad,) = torch.autograd.grad(loss, x_in)
        return x_grad

    def sam_gradient(self, x: torch.Tensor, y: torch.Tensor, grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """Step 3: set ``p.grad`` to ``∇_θ CE(θ + ε)`` (``ε`` from ``grads``, BN running statistics frozen) and
        return ``CE(θ + ε)``; if ``x`` requires grad, ``x.grad`` receives ``∇_x CE(θ + ε)``.

        :meth:`~dgkit.methods.sharpness.Sharpness.sharpness_backward`'s maths, but ``θ + ε`` is built out of
        place (:meth:`loss_at`) instead of moving ``θ`` in place and back: step 1's graph, which step 4
        back-propagates when the source features are shared, stays valid (an in-place move bumps the
        parameters' version counters).
        """
        epsilon = sharpness_epsilon(grads, self.rho)  # before clearing .grad: `grads` may alias it
        for p in self.trainable_parameters():
            p.grad = None
        with frozen_running_stats(self):
            loss = self.loss_at(x, y, epsilon)
            self.manual_backward(loss)
        return loss.detach()

    def loss_at(self, x: torch.Tensor, y: torch.Tensor, epsilon: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """The task loss at ``θ + ε`` (``ε`` aligned with :meth:`trainable_parameters`, ``None``: not moved),
        through ``torch.func.functional_call``: differentiable with respect to ``θ`` and ``x``, ``θ`` untouched."""
        names = [name for name, p in self.named_parameters() if p.requires_grad]
        params = self.trainable_parameters()
        moved = {n: p if e is None else p + e for n, p, e in zip(names, params, epsilon, strict=True)}
        return self.task.loss(functional_call(self, moved, (x,)), y)

    def inconsistency(
        self,
        x: torch.Tensor,
        x_adv: torch.Tensor,
        y: torch.Tensor,
        sizes: Sequence[int],
        z_source: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 4: ``(penalty_var, penalty_norm)`` summed over the chunks of ``sizes`` rows (source domains).

        Args:
            x: source inputs ``(B, ...)``.
            x_adv: their perturbed copies ``(B, ...)``.
            y: labels ``(B,)``.
            sizes: rows per chunk, summing to ``B`` (one chunk per source domain, or ``[B]``).
            z_source: the features of ``x`` at ``θ`` from an earlier forward, when they equal those of ``x`` in
                the batch ``cat(x, x_adv)`` (see :func:`per_sample_and_deterministic`): only ``x_adv`` is then
                forwarded. ``None``: one forward of ``cat(x, x_adv)``.
        """
        with frozen_running_stats(self):
            if z_source is None:
                z = self.task.features(self.backbone, torch.cat([x, x_adv]))  # (2B, D)
            else:
                z = torch.cat([z_source, self.task.features(self.backbone, x_adv)])  # (2B, D)
        grads = per_sample_head_grads(self.classifier, z, torch.cat([y, y]))  # {name: (2B, *shape)}
        total_var, total_norm = z.new_zeros(()), z.new_zeros(())
        start, n = 0, len(y)
        for size in sizes:
            source = {k: g[start : start + size] for k, g in grads.items()}
            adv = {k: g[n + start : n + start + size] for k, g in grads.items()}
            penalty_var, penalty_norm = inconsistency_penalty(source, adv)
            total_var, total_norm = total_var + penalty_var, total_norm + penalty_norm
            start += size
        return total_var, total_norm
