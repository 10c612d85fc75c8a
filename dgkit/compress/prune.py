"""Unstructured pruning as a chain link: magnitude, Wanda and D-Pruner importances, per-layer sparsity, masks kept
through an optional recovery fine-tune on the source domains.

Importances (one score per weight; each selected layer then loses its ``sparsity`` lowest-scored weights):

- ``magnitude``: ``|W|`` (no data).
- ``wanda`` (Sun et al., "A Simple and Effective Pruning Approach for LLMs", ICLR 2024): ``|W_ij|·||x_j||``,
  ``||x_j||`` the L2 norm of input channel ``j`` over one source domain's calibration inputs (a convolution's
  input channel over every position, shared by its ``kh·kw`` taps); the per-domain scores are combined by
  ``combine`` (:func:`~dgkit.compress.calibration.combine_domains`).
- ``dpruner`` (Zhang et al., "Pruning as a Domain-specific LLM Extractor", NAACL Findings 2024), for vision:
  a *general* score, SparseGPT's OBS saliency ``W_ij² / [chol(H⁻¹)]_jj²`` with ``H = (2/n) Σ x xᵀ`` over every
  source calibration input, damped by ``damp`` (1 %) of its mean diagonal; a convolution uses its unfolded input
  (``Cin·kh·kw`` columns, ordered as ``W.flatten(1)``; one ``H`` per group of a grouped convolution). And a
  *domain* score per source domain, the empirical-Fisher Taylor term ``|g⊙θ| + ½(g⊙θ)²`` with ``g`` the gradient
  of the task loss on that domain's calibration images, combined across domains by ``combine``. The two are
  each divided by their mean and summed: ``general_weight·Ĝ + (1 − general_weight)·D̂``. The paper's general set
  is an open-domain corpus; in DG the pooled source domains play that part. Its OBS weight updates and the
  refined (regularised) training loss are not reproduced: the score is computed on the trained weights.

Masks zero the weights in place, so a checkpoint holds the zeros and :meth:`UnstructuredPrune.replay` only
merges adapters. With ``recover_steps > 0`` the model is fine-tuned on the source domains' training stream (the
method's own ``training_losses``) with every mask re-applied after each optimiser step.

Written by hand: a mask is a sort per layer, and ``torch.nn.utils.prune`` adds reparametrisation hooks that a
checkpoint would then have to carry.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dgkit.chain import TransformContext
from dgkit.compress.base import CompressionTransform
from dgkit.compress.calibration import COMBINATIONS, Calibration, collect_inputs, combine_domains
from dgkit.methods.base import Method

IMPORTANCES = ("magnitude", "wanda", "dpruner")


# ---- scores -------------------------------------------------------------------------------------------------
def per_weight(layer: nn.Module, channel: torch.Tensor) -> torch.Tensor:
    """A per-input-channel vector broadcast to ``layer.weight``'s shape (grouped convolutions: each output
    channel sees its group's slice of the inputs)."""
    if isinstance(layer, nn.Linear):
        return channel[None, :].expand_as(layer.weight)
    out_channels, groups = layer.weight.shape[0], layer.groups
    by_output = channel.reshape(groups, -1).repeat_interleave(out_channels // groups, dim=0)  # (Cout, Cin/G)
    return by_output[:, :, None, None].expand_as(layer.weight)


def wanda_scores(layer: nn.Module, norms: dict[str, torch.Tensor], combine: str = "min",
                 weights: dict[str, float] | None = None) -> torch.Tensor:  # fmt: skip
    """``|W|·||x_j||`` per domain (``norms``: ``{domain: per-input-channel norm}``), combined across domains."""
    magnitude = layer.weight.detach().abs()
    return combine_domains({d: magnitude * per_weight(layer, n) for d, n in norms.items()}, combine, weights)


def obs_saliency(weight: torch.Tensor, hessian: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """SparseGPT's OBS saliency ``W_ij² / U_jj²``, ``U`` the upper Cholesky factor of ``(H + λI)⁻¹``.

    Args:
        weight: ``(N, K)``.
        hessian: ``(K, K)``, ``(2/n) Σ x xᵀ`` over the layer's input rows.
        damp: ``λ`` as a fraction of the mean diagonal. Inputs that are always zero (dead) get a unit diagonal, as
            in SparseGPT, and a zero score: their weights never act.

    Returns:
        ``(N, K)`` in ``weight``'s dtype (computed in float64).
    """
    h = hessian.detach().double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.diagonal(h).mean() * torch.eye(len(h), dtype=h.dtype, device=h.device)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    u_diag = torch.diagonal(torch.linalg.cholesky(inverse, upper=True))  # (K,)
    scores = weight.detach().double().square() / u_diag.square()[None, :]
    scores[:, dead] = 0.0
    return scores.to(weight.dtype)


def taylor_fisher(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """D-Pruner's domain importance: ``|g⊙θ| + ½(g⊙θ)²`` (first-order Taylor plus empirical Fisher)."""
    gw = grad * weight.detach()
    return gw.abs() + 0.5 * gw.square()


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask (``True`` kept) dropping the ``round(sparsity·numel)`` lowest scores of one layer."""
    n_pruned = round(sparsity * scores.numel())
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[torch.argsort(scores.flatten(), stable=True)[:n_pruned]] = False
    return mask.reshape(scores.shape)


def _check_reached(seen: dict[str, Any]) -> None:
    """Raise when a selected layer saw no input during calibration (it is not on the forward path)."""
    missed = [n for n, v in seen.items() if v is None or (isinstance(v, dict) and not v)]
    if missed:
        raise ValueError(f"compress: layers {missed} saw no input on the calibration images; exclude them")


def _mean_normalised(x: torch.Tensor) -> torch.Tensor:
    return x / x.mean().clamp(min=1e-12)


# ---- calibration passes -------------------------------------------------------------------------------------
def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def input_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as rows ``(R, groups, K)`` matching ``weight.flatten(1)``'s columns: a linear's features,
    a convolution's unfolded ``Cin/G·kh·kw`` patch per group (zero padding)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, 1, x.shape[-1])
    padding = layer.padding
    if isinstance(padding, str):  # "valid" or "same" (odd kernels)
        same = padding == "same"
        padding = tuple(d * (k - 1) // 2 if same else 0 for k, d in zip(layer.kernel_size, layer.dilation))
    patches = F.unfold(x, layer.kernel_size, layer.dilation, padding, layer.stride)  # (B, Cin·kh·kw, L)
    return patches.transpose(1, 2).reshape(-1, layer.groups, patches.shape[1] // layer.groups)


@torch.no_grad()
def collect_hessians(model: nn.Module, names: list[str], calibration: Calibration) -> dict[str, torch.Tensor | None]:
    """``{layer: H (groups, K, K)}``, ``H = (2/n) Σ x xᵀ`` over every calibration input row of every domain
    (``None`` for a layer the images never reach)."""
    modules = {n: model.get_submodule(n) for n in names}
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = dict.fromkeys(names, 0)

    def hook(name: str):
        def record(layer: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = input_rows(layer, inputs[0].detach().float())  # (R, G, K)
            h = torch.einsum("rgk,rgl->gkl", x, x)
            sums[name] = sums[name] + h if name in sums else h
            rows[name] += len(x)

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        for _, x, _ in calibration.batches():
            model(x.to(_device(model)))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: 2 * sums[n] / rows[n] if rows[n] else None for n in names}


def domain_gradients(model: nn.Module, params: dict[str, nn.Parameter],
                     calibration: Calibration) -> dict[str, dict[str, torch.Tensor]]:  # fmt: skip
    """``{domain: {name: grad}}``: the gradient of the task loss (``model.task.loss``), averaged over each
    domain's calibration images, for each of ``params`` (frozen ones included; zeros where unused). The model
    runs in eval mode and its parameters' gradients are left untouched."""
    flags = {n: p.requires_grad for n, p in params.items()}
    counts = calibration.counts()
    was_training = model.training
    model.eval()
    grads: dict[str, dict[str, torch.Tensor]] = {}
    try:
        for p in params.values():
            p.requires_grad_(True)
        with torch.enable_grad():
            for domain, x, y in calibration.batches():
                device = _device(model)
                loss = model.task.loss(model(x.to(device)), y.to(device)) * len(y) / counts[domain]
                batch = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                acc = grads.setdefault(domain, {n: torch.zeros_like(p) for n, p in params.items()})
                for n, g in zip(params, batch):
                    if g is not None:
                        acc[n] += g
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
        model.train(was_training)
    return grads


# ---- recovery -----------------------------------------------------------------------------------------------
def _source_batches(datamodule: Any) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The run's training stream, ``{source domain: (x, y)}`` per step (the datamodule's own loader: source
    domains only, continuing where training stopped when a trainer is attached)."""
    for batch, _, _ in datamodule.train_dataloader():  # CombinedLoader: (batch, batch index, loader index)
        yield batch


def _training_loss(model: nn.Module, batch: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """A method's own objective; for a plain model (an inference model) its task loss on the pooled batch."""
    if isinstance(model, Method):
        return model.training_losses(batch)["loss"]
    x, y = Method.concat(batch)
    return model.task.loss(model(x), y)


def recover(model: nn.Module, datamodule: Any, steps: int, lr: float,
            masks: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:  # fmt: skip
    """Fine-tune ``model`` for ``steps`` Adam steps on the source domains' training stream; every ``masks`` entry
    (``{layer: keep-mask}``) zeroes its weight's gradient before and its weight after each step.

    Returns:
        ``{"steps", "lr", "loss_first", "loss_last"}``.

    Raises:
        ValueError: no datamodule (a data-free context).
    """
    if datamodule is None:
        raise ValueError("compress recover_steps > 0 needs the run's training data; set recover_steps=0 here")
    masked = {n: (model.get_submodule(n).weight, m.to(_device(model))) for n, m in (masks or {}).items()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses: list[float] = []
    was_training = model.training
    model.train()
    try:
        with torch.enable_grad():
            for _, batch in zip(range(steps), _source_batches(datamodule)):
                device = _device(model)
                batch = {d: (x.to(device), y.to(device)) for d, (x, y) in batch.items()}
                loss = _training_loss(model, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for weight, mask in masked.values():
                    if weight.grad is not None:
                        weight.grad.mul_(mask)
                optimizer.step()
                with torch.no_grad():
                    for weight, mask in masked.values():
                        weight.mul_(mask)
                losses.append(float(loss.detach()))
    finally:
        model.train(was_training)
        optimizer.zero_grad(set_to_none=True)
    return {"steps": len(losses), "lr": lr, "loss_first": losses[0], "loss_last": losses[-1]}


def check_choices(importance: str, valid_importances: tuple[str, ...], combine: str,
                  domain_weights: dict[str, float] | None, recover_steps: int, recover_lr: float) -> None:  # fmt: skip
    """Validate the arguments pruning links share.

    Raises:
        ValueError: naming the bad value and the valid choices.
    """
    if importance not in valid_importances:
        raise ValueError(f"compress importance={importance!r}; choose one of {valid_importances}")
    if combine not in COMBINATIONS:
        raise ValueError(f"compress combine={combine!r}; choose one of {COMBINATIONS}")
    if combine == "weighted" and not domain_weights:
        raise ValueError("compress combine=weighted needs domain_weights: {domain: weight} for every source domain")
    if recover_steps < 0 or recover_lr <= 0:
        raise ValueError(f"compress recover_steps={recover_steps} must be >= 0 and recover_lr={recover_lr} > 0")


# ---- the link -----------------------------------------------------------------------------------------------
class UnstructuredPrune(CompressionTransform):
    """Per-layer unstructured pruning of the backbone's linears and convolutions, a chain link
    (``compress=prune_magnitude|prune_wanda|prune_dpruner``).

    Args:
        importance: ``magnitude``, ``wanda`` or ``dpruner`` (see the module docstring).
        sparsity: fraction of each selected layer's weights set to zero, in [0, 1).
        combine: how per-domain scores are combined: ``mean``, ``min`` (a weight keeps its best score over the
            source domains: important to one domain is enough) or ``weighted`` (``domain_weights``).
        domain_weights: ``{domain: weight}`` for ``combine=weighted``.
        general_weight: ``dpruner``: weight of the general (OBS) score against the domain (Taylor-Fisher) score.
        damp: ``dpruner``: Hessian damping, a fraction of its mean diagonal.
        recover_steps: Adam steps of masked fine-tuning on the source domains after pruning (0: none).
        recover_lr: their learning rate.
        calibration, include, exclude, default_exclude: see :class:`~dgkit.compress.base.CompressionTransform`.

    State: ``{"layers": {layer: sparsity reached}, "calibration": Calibration.record() or None (magnitude),
    "report": {"importance", "combine", "general_weight", "target_sparsity", "layers", "sparsity" (per layer),
    "overall_sparsity", "recovery" ({"steps", "lr", "loss_first", "loss_last"} or None)}}``.
    """

    layer_types: ClassVar[tuple[type, ...]] = (nn.Linear, nn.Conv2d)

    def __init__(self, importance: str = "magnitude", sparsity: float = 0.5, combine: str = "min",
                 domain_weights: dict[str, float] | None = None, general_weight: float = 0.5, damp: float = 0.01,
                 recover_steps: int = 0, recover_lr: float = 1e-4, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(**kwargs)
        check_choices(importance, IMPORTANCES, combine, domain_weights, recover_steps, recover_lr)
        if not 0 <= sparsity < 1:
            raise ValueError(f"compress sparsity={sparsity} must be in [0, 1)")
        if not 0 <= general_weight <= 1 or damp < 0:
            raise ValueError(f"compress general_weight={general_weight} must be in [0, 1] and damp={damp} >= 0")
        self.importance, self.sparsity, self.combine = importance, float(sparsity), combine
        self.domain_weights = dict(domain_weights) if domain_weights else None
        self.general_weight, self.damp = float(general_weight), float(damp)
        self.recover_steps, self.recover_lr = int(recover_steps), float(recover_lr)

    def transform(self, model: nn.Module, context: TransformContext) -> dict[str, Any]:
        """Zero each selected layer's lowest-scored weights (then recover, masks kept); return the reached
        sparsity per layer, the calibration record and a report."""
        self.prepare(model)
        names = self.layers(model)
        calibration = None if self.importance == "magnitude" else self.calibrate(context)
        scores = self.scores(model, names, calibration)
        masks = {}
        with torch.no_grad():
            for name in names:
                weight = model.get_submodule(name).weight
                masks[name] = layer_mask(scores[name], self.sparsity)
                weight.mul_(masks[name])
        recovery = None
        if self.recover_steps:
            recovery = recover(model, context.datamodule, self.recover_steps, self.recover_lr, masks)
        reached = {n: float((model.get_submodule(n).weight == 0).float().mean()) for n in names}
        sizes = {n: model.get_submodule(n).weight.numel() for n in names}
        overall = sum(reached[n] * sizes[n] for n in names) / sum(sizes.values())
        report = {
            "importance": self.importance,
            "combine": None if self.importance == "magnitude" else self.combine,
            "general_weight": self.general_weight if self.importance == "dpruner" else None,
            "target_sparsity": self.sparsity,
            "layers": names,
            "sparsity": reached,
            "overall_sparsity": overall,
            "recovery": recovery,
        }
        return {"layers": reached, "calibration": calibration.record() if calibration else None, "report": report}

    def replay(self, model: nn.Module, state: dict[str, Any]) -> None:
        """Nothing to rebuild: the zeros are in the checkpoint's weights (adapters are merged, as on transform)."""
        self.prepare(model)

    def scores(self, model: nn.Module, names: list[str], calibration: Calibration | None) -> dict[str, torch.Tensor]:
        """``{layer: per-weight importance}`` (weight-shaped) under the configured ``importance``."""
        layers = {n: model.get_submodule(n) for n in names}
        if self.importance == "magnitude":
            return {n: m.weight.detach().abs() for n, m in layers.items()}
        if self.importance == "wanda":
            stats = collect_inputs(model, names, calibration)
            _check_reached(stats)
            norms = {n: {d: s.norm.to(layers[n].weight) for d, s in stats[n].items()} for n in names}
            return {n: wanda_scores(m, norms[n], self.combine, self.domain_weights) for n, m in layers.items()}
        return self._dpruner(model, layers, calibration)

    def _dpruner(self, model: nn.Module, layers: dict[str, nn.Module], calibration: Calibration) -> dict:
        """``general_weight·Ĝ + (1 − general_weight)·D̂`` per layer (see the module docstring)."""
        hessians = collect_hessians(model, list(layers), calibration)
        _check_reached(hessians)
        grads = domain_gradients(model, {n: m.weight for n, m in layers.items()}, calibration)
        out = {}
        for name, layer in layers.items():
            w = layer.weight.detach()
            h = hessians[name]  # (G, K, K)
            rows = w.flatten(1).reshape(len(h), -1, h.shape[-1])  # (G, Cout/G, K)
            general = torch.stack([obs_saliency(rows[g], h[g], self.damp) for g in range(len(h))]).reshape(w.shape)
            per_domain = {d: taylor_fisher(w, g[name]) for d, g in grads.items()}
            domain = combine_domains(per_domain, self.combine, self.domain_weights)
            g_weight = self.general_weight
            out[name] = g_weight * _mean_normalised(general) + (1 - g_weight) * _mean_normalised(domain)
        return out
