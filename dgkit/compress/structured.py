"""Structured pruning as a chain link: whole MLP channels, attention heads or convolution channels removed with
Torch-Pruning's dependency graph (DepGraph, Fang et al., CVPR 2023), so the pruned model is smaller and faster on
ordinary dense kernels.

The roots are the first linear of each transformer MLP (``mlp.fc1``, SAM's ``mlp.lin1``; its hidden channels go,
with ``fc2``'s matching inputs), the fused ``attn.qkv`` of each attention (whole heads go, with ``proj``'s inputs;
head dimensions are kept, so SDPA's ``1/√head_dim`` scale is unchanged), or every selected convolution (its output
channels go, with whatever depends on them: norms, the next layer's inputs). ``ratio`` is the fraction removed
per root (heads: ``ceil(ratio·heads)`` per attention). Every other layer is ignored as a root, so a ViT keeps
its residual width (patch embedding, ``attn.proj``, ``mlp.fc2`` and the head are never roots), and a group that
would change the width the head reads (the backbone's output) is skipped: the head, DANN's discriminator and
any adapter-free consumer of the features keep their shapes. Layers outside the backbone and head are never
touched (the graph is traced through ``forward`` only).

Importance: ``magnitude`` (Torch-Pruning's group L2 norm) or ``taylor``: Torch-Pruning's group Taylor score
``|w·g|`` computed once per source domain from that domain's calibration gradient (task loss, eval mode), each
normalised by its mean and combined by ``combine`` (:class:`DomainTaylorImportance`).

State: the pruning history (root layer name, output or input side, removed indices, in order) and the example
input shape. :meth:`StructuredPrune.replay` rebuilds the dependency graph on a fresh model and replays the
history through ``DependencyGraph.load_pruning_history`` (``get_pruning_group`` per entry), then patches timm's
``Attention`` attributes as :meth:`StructuredPrune.transform` did, without data.

Torch-Pruning does the structural work (coupled layers, index mapping through the qkv reshape); dgkit only
picks the roots, adds the per-domain importance and records what replay needs.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any, ClassVar

import torch
import torch_pruning as tp
from timm.layers import Attention
from torch import nn

from dgkit.chain import TransformContext
from dgkit.compress.base import CompressionTransform, matches
from dgkit.compress.calibration import combine_domains
from dgkit.compress.prune import check_choices, domain_gradients, recover

TARGETS = ("mlp", "heads", "conv")
IMPORTANCES = ("magnitude", "taylor")
ROOT_PATTERNS = {"mlp": ("mlp.fc1", "mlp.lin1"), "heads": ("attn.qkv",)}
"""The root layers of the transformer targets (``conv``: every selected ``nn.Conv2d``)."""
_ROOT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LSTM)


class DomainTaylorImportance(tp.importance.Importance):
    """Group Taylor importance computed once per domain from a gradient snapshot, combined across domains.

    Args:
        model: the model being pruned (its parameters receive each domain's gradients in turn).
        gradients: ``{domain: {parameter name: gradient}}`` (:func:`~dgkit.compress.prune.domain_gradients`).
        combine: ``mean``, ``min`` or ``weighted`` (:func:`~dgkit.compress.calibration.combine_domains`).
        weights: ``{domain: weight}`` for ``weighted``.
    """

    def __init__(self, model: nn.Module, gradients: dict[str, dict[str, torch.Tensor]], combine: str = "min",
                 weights: dict[str, float] | None = None) -> None:  # fmt: skip
        self.model, self.gradients = model, gradients
        self.combine, self.weights = combine, weights
        self.taylor = tp.importance.GroupTaylorImportance()

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        """One score per channel of ``group`` (``None`` when no layer of the group carries a Taylor score)."""
        scores = {}
        params = dict(self.model.named_parameters())
        try:
            for domain, grads in self.gradients.items():
                for name, p in params.items():
                    g = grads.get(name)
                    p.grad = g if g is not None and g.shape == p.shape else None
                scores[domain] = self.taylor(group)
        finally:
            for p in params.values():
                p.grad = None
        if any(s is None for s in scores.values()):
            return None
        return combine_domains(scores, self.combine, self.weights)


def _targets(target: str | list[str]) -> list[str]:
    targets = [target] if isinstance(target, str) else list(target)
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise ValueError(f"compress target={target!r}; choose one or more of {TARGETS}")
    return targets


def _attention_heads(model: nn.Module) -> dict[str, int]:
    """Set every timm ``Attention``'s ``attn_dim`` and ``num_heads`` from its (pruned) ``qkv`` width, head_dim
    kept; return ``{name: num_heads}``."""
    heads = {}
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            attn_dim = module.qkv.out_features // 3
            if attn_dim % module.head_dim:
                raise RuntimeError(f"{name}: qkv width {attn_dim} is not a multiple of head_dim {module.head_dim}")
            module.attn_dim, module.num_heads = attn_dim, attn_dim // module.head_dim
            heads[name] = module.num_heads
    return heads


def _quiet_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """The dependency graph of ``model`` (eval mode), without Torch-Pruning's note on unwrapped parameters
    (``cls_token``, ``pos_embed``: they follow the residual width, which is never a root here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unwrapped parameters")
        return tp.DependencyGraph().build_dependency(model, example_inputs=example)


class StructuredPrune(CompressionTransform):
    """Structured pruning of MLP channels, attention heads or convolution channels, a chain link
    (``compress=prune_structured``).

    Args:
        target: ``mlp``, ``heads``, ``conv`` or a list of them (e.g. ``[mlp, heads]``).
        ratio: fraction of each root's channels (heads: of each attention's heads) removed, in (0, 1).
        importance: ``magnitude`` (group L2 norm) or ``taylor`` (per-domain gradients, combined).
        combine: ``taylor``: ``mean``, ``min`` or ``weighted`` across source domains.
        domain_weights: ``{domain: weight}`` for ``combine=weighted``.
        recover_steps: Adam steps of fine-tuning on the source domains after pruning (0: none).
        recover_lr: their learning rate.
        calibration, include, exclude, default_exclude: see :class:`~dgkit.compress.base.CompressionTransform`.

    State: ``{"history": [[root layer, output side?, [removed indices]], ...], "input_shape": [1, C, H, W],
    "heads": {attention: heads left}, "calibration": Calibration.record() or None (magnitude), "report": {"target",
    "ratio", "importance", "combine", "params": [before, after], "macs": [before, after], "channels": {root:
    [before, after]}, "skipped" (roots whose group reaches the head), "recovery"}}``.
    """

    layer_types: ClassVar[tuple[type, ...]] = (nn.Linear, nn.Conv2d)

    def __init__(self, target: str | list[str] = "mlp", ratio: float = 0.5, importance: str = "magnitude",
                 combine: str = "min", domain_weights: dict[str, float] | None = None, recover_steps: int = 0,
                 recover_lr: float = 1e-4, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(**kwargs)
        self.targets = _targets(target)
        check_choices(importance, IMPORTANCES, combine, domain_weights, recover_steps, recover_lr)
        if not 0 < ratio < 1:
            raise ValueError(f"compress ratio={ratio} must be in (0, 1)")
        kinds = {nn.Conv2d if t == "conv" else nn.Linear for t in self.targets}
        self.layer_types = tuple(t for t in (nn.Linear, nn.Conv2d) if t in kinds)
        self.ratio, self.importance, self.combine = float(ratio), importance, combine
        self.domain_weights = dict(domain_weights) if domain_weights else None
        self.recover_steps, self.recover_lr = int(recover_steps), float(recover_lr)

    def roots(self, model: nn.Module) -> list[str]:
        """The selected layers that root a pruning group for the configured targets.

        Raises:
            ValueError: none (e.g. ``target=heads`` on a CNN).
        """
        names = self.layers(model)
        chosen = []
        for name in names:
            conv = isinstance(model.get_submodule(name), nn.Conv2d)
            patterns = [p for t in self.targets if t != "conv" for p in ROOT_PATTERNS[t]]
            if (conv and "conv" in self.targets) or any(matches(name, p) for p in patterns):
                chosen.append(name)
        if not chosen:
            raise ValueError(f"compress target={self.targets}: no root layer among {names[:8]}... (roots: "
                             f"{ROOT_PATTERNS} or nn.Conv2d for conv)")  # fmt: skip
        return chosen

    def transform(self, model: nn.Module, context: TransformContext) -> dict[str, Any]:
        """Remove channels/heads in place; return the pruning history, the example input shape, the heads per
        attention, the calibration record and a report (parameters and MACs before/after, channels per root)."""
        self.prepare(model)
        roots = self.roots(model)
        data_config = model.backbone.data_config
        input_shape = [1, len(data_config.mean), *data_config.input_size]
        example = torch.zeros(input_shape, device=next(model.parameters()).device)
        calibration = self.calibrate(context) if self.importance == "taylor" else None
        before = {n: self._width(model, n) for n in roots}
        was_training = model.training
        model.eval()  # tracing and counting run forward passes: no batch-norm statistics update, no dropout
        try:
            macs_before, params_before = tp.utils.count_ops_and_params(model, example)
            history, skipped = self._prune(model, roots, example, calibration)
            heads = _attention_heads(model)
            macs_after, params_after = tp.utils.count_ops_and_params(model, example)
        finally:
            model.train(was_training)
        recovery = None
        if self.recover_steps:
            recovery = recover(model, context.datamodule, self.recover_steps, self.recover_lr)
        report = {
            "target": self.targets,
            "ratio": self.ratio,
            "importance": self.importance,
            "combine": self.combine if self.importance == "taylor" else None,
            "params": [int(params_before), int(params_after)],
            "macs": [int(macs_before), int(macs_after)],
            "channels": {n: [before[n], self._width(model, n)] for n in roots},
            "skipped": skipped,
            "recovery": recovery,
        }
        calibration_record = calibration.record() if calibration else None
        return {"history": history, "input_shape": input_shape, "heads": heads, "calibration": calibration_record,
                "report": report}  # fmt: skip

    def replay(self, model: nn.Module, state: dict[str, Any]) -> None:
        """Rebuild the pruned structure on a fresh model from the recorded history (no data).

        Raises:
            RuntimeError: the rebuilt attention heads differ from the recorded ones (another architecture).
        """
        self.prepare(model)
        was_training = model.training
        model.eval()
        try:
            example = torch.zeros(state["input_shape"], device=next(model.parameters()).device)
            graph = _quiet_graph(model, example)
            graph.load_pruning_history(copy.deepcopy(state["history"]))
        finally:
            model.train(was_training)
        heads = _attention_heads(model)
        if heads != state.get("heads", heads):
            raise RuntimeError(f"replayed pruning gives attention heads {heads}, the record says {state['heads']}")

    # ---- internals --------------------------------------------------------------------------------------
    @staticmethod
    def _width(model: nn.Module, name: str) -> int:
        layer = model.get_submodule(name)
        return int(layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels)

    def _importance(self, model: nn.Module, calibration: Any) -> tp.importance.Importance:
        if self.importance == "magnitude":
            return tp.importance.GroupMagnitudeImportance(p=2)
        grads = domain_gradients(model, dict(model.named_parameters()), calibration)
        return DomainTaylorImportance(model, grads, self.combine, self.domain_weights)

    def _prune(self, model: nn.Module, roots: list[str], example: torch.Tensor,
               calibration: Any) -> tuple[list[list[Any]], list[str]]:  # fmt: skip
        """Run Torch-Pruning with ``roots`` as the only roots; skip groups that reach outside the backbone.

        Returns:
            the pruning history ``[[root name, output side?, [removed indices]], ...]`` and the skipped roots.
        """
        root_modules = {model.get_submodule(n) for n in roots}
        ignored = [m for m in model.modules() if isinstance(m, _ROOT_TYPES) and m not in root_modules]
        heads = {}
        if "heads" in self.targets:
            for name in roots:
                if any(matches(name, p) for p in ROOT_PATTERNS["heads"]):
                    heads[model.get_submodule(name)] = self._heads_of(model, name)
        importance = self._importance(model, calibration)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Unwrapped parameters")
            pruner = tp.pruner.BasePruner(
                model, example, importance, pruning_ratio=self.ratio, ignored_layers=ignored, num_heads=heads,
                prune_num_heads=bool(heads), prune_head_dims=False, head_pruning_ratio=self.ratio if heads else 0.0,
            )  # fmt: skip
        outside = self._outside_backbone(model)
        names = {id(m): n for n, m in model.named_modules()}
        skipped = []
        for group in pruner.step(interactive=True):
            if any(id(dep.target.module) in outside for dep, _ in group):
                skipped.append(names.get(id(group[0].dep.target.module), "?"))
                continue
            group.prune()
        history = [[str(n), bool(out), [int(i) for i in idxs]] for n, out, idxs in pruner.pruning_history()]
        return history, skipped

    def _heads_of(self, model: nn.Module, qkv_name: str) -> int:
        """The head count of the attention owning ``qkv_name``; refuses a ratio that would remove every head."""
        heads = int(model.get_submodule(qkv_name.rpartition(".")[0]).num_heads)
        removed = math.ceil(self.ratio * heads)  # as Torch-Pruning rounds
        if removed >= heads:
            raise ValueError(f"compress ratio={self.ratio} would remove all {heads} heads of {qkv_name}")
        return heads

    @staticmethod
    def _outside_backbone(model: nn.Module) -> set[int]:
        """Ids of the model's modules and parameters that are not the backbone's (the head, discriminators)."""
        backbone = getattr(model, "backbone", None)
        if backbone is None:
            return set()
        inside = {id(x) for x in [*backbone.modules(), *backbone.parameters()]}
        return {id(x) for x in [*model.modules(), *model.parameters()]} - inside
