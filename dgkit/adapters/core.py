"""The adapter mechanism: swap matched linear layers for wrappers, fold them back, choose what trains.

- :func:`inject` replaces every ``nn.Linear`` whose qualified name matches a regex with ``wrap(name, linear)``;
- :func:`merge` folds every adapter back into a plain ``nn.Linear`` (and fused ``qkv`` layers that were split
  for adaptation back into one layer), so the deployed model costs exactly what the base model costs;
- :func:`mark_trainable` sets ``requires_grad`` by parameter-name patterns;
- :func:`regularizers` sums the penalties adapters expose (PEGO's orthogonality loss).

Hand-written adapters subclass :class:`AdapterLinear` (``base`` + a low-rank update); peft's LoRA layers are
handled through peft's own ``merge``/``get_base_layer``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from dgkit.adapters.qkv import SplitQKV

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


class AdapterLinear(nn.Module):
    """A linear layer plus a trainable update: ``y = base(x) + x ΔWᵀ``; merged, ``W = base.weight + ΔW``.

    Subclasses implement :meth:`delta_weight` and :meth:`delta` (the update applied to an input, in low-rank
    order) and may override :meth:`regularizer`.

    Args:
        base: the wrapped linear layer (its weight is frozen by the adapter spec, not here).
    """

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight ``(out, in)`` (read by code that inspects ``.weight``)."""
        return self.base.weight + self.delta_weight()

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias."""
        return self.base.bias

    def delta_weight(self) -> torch.Tensor:
        """The weight update ``ΔW`` ``(out, in)``."""
        raise NotImplementedError

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The update's output ``x ΔWᵀ`` ``(..., out)``, computed in low-rank order."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + delta(x)``."""
        return self.base(x) + self.delta(x)

    def regularizer(self) -> torch.Tensor | None:
        """A penalty to add to the training loss (already weighted), or ``None``."""
        return None

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None)
        out = out.to(device=self.base.weight.device, dtype=self.base.weight.dtype)
        out.weight.copy_(self.base.weight + self.delta_weight().to(self.base.weight.dtype))
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
        return out


def block_index(name: str) -> int | None:
    """The transformer block index in a qualified name (``model.blocks.7.attn.qkv`` → 7), else ``None``."""
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None


def linear_names(model: nn.Module) -> list[str]:
    """Qualified names of every ``nn.Linear`` in ``model`` (adapters' inner layers excluded)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not _inside_adapter(model, name):
            names.append(name)
    return names


def describe_linears(names: Iterable[str]) -> str:
    """A short listing of linear layer names, block indices collapsed (``blocks.<i>.attn.qkv (x12)``)."""
    counts: dict[str, int] = {}
    for name in names:
        key = _BLOCK.sub(lambda m: m.group(0).replace(m.group(1), "<i>"), name)
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(k + (f" (x{n})" if n > 1 else "") for k, n in counts.items())


def _inside_adapter(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    for i in range(1, len(parts)):
        parent = model.get_submodule(".".join(parts[:i])) if i else model
        if isinstance(parent, AdapterLinear | BaseTunerLayer):
            return True
    return False


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def select_linears(model: nn.Module, target: str) -> list[str]:
    """Qualified names of the ``nn.Linear`` layers of ``model`` whose name matches ``target`` (``re.search``).

    Raises:
        ValueError: when ``model`` has no linear layer, or ``target`` matches none (the names are listed).
    """
    names = linear_names(model)
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layers to adapt: adapters need a transformer backbone "
            "(e.g. backbone=vit_digits or backbone=test_vit); use adapter=none or adapter=freeze here"
        )
    pattern = re.compile(target)
    chosen = [n for n in names if pattern.search(n)]
    if not chosen:
        raise ValueError(
            f"adapter target {target!r} matches none of the {len(names)} linear layers of {type(model).__name__}: "
            f"{describe_linears(names)}"
        )
    return chosen


def inject(model: nn.Module, target: str, wrap: Callable[[str, nn.Linear], nn.Module]) -> list[str]:
    """Replace every ``nn.Linear`` whose qualified name matches ``target`` (``re.search``) by ``wrap(name, layer)``.

    Args:
        model: the module to transform in place.
        target: a regular expression searched in each linear layer's qualified name.
        wrap: builds the replacement from the name and the original layer.

    Returns:
        The replaced names, in module order.

    Raises:
        ValueError: as :func:`select_linears`.
    """
    chosen = select_linears(model, target)
    for name in chosen:
        _set_submodule(model, name, wrap(name, model.get_submodule(name)))
    return chosen


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter of ``model`` (in place) into plain ``nn.Linear`` layers; re-fuse split ``qkv`` layers.

    Returns:
        ``model``, for chaining. Its outputs are unchanged (up to float rounding).
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, AdapterLinear):
            _set_submodule(model, name, module.merged())
        elif isinstance(module, BaseTunerLayer):
            module.merge()
            _set_submodule(model, name, module.get_base_layer())
    for name, module in list(model.named_modules()):
        if isinstance(module, SplitQKV):
            _set_submodule(model, name, module.fused())
    return model


def mark_trainable(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Set ``requires_grad=True`` on the parameters whose qualified names match any regex in ``patterns``.

    Returns:
        The names of the parameters marked.
    """
    compiled = [re.compile(p) for p in patterns]
    marked = []
    for name, param in model.named_parameters():
        if any(p.search(name) for p in compiled):
            param.requires_grad_(True)
            marked.append(name)
    return marked


def regularizers(model: nn.Module) -> torch.Tensor | None:
    """The sum of every adapter's :meth:`AdapterLinear.regularizer` in ``model``; ``None`` when none has one."""
    terms = [m.regularizer() for m in model.modules() if isinstance(m, AdapterLinear)]
    terms = [t for t in terms if t is not None]
    return torch.stack(terms).sum() if terms else None
