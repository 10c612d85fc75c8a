"""Fused attention projections split into separate q, k and v layers, and fused back.

timm ViTs and SAM's image encoder compute ``qkv = Linear(d, 3d)`` with rows ordered ``[q; k; v]``. SoMA takes
the SVD per projection (never of the fused ``3d × d`` matrix), PEGO and MapSAM adapt only the q and v slices:
both are an adapter on the separate layers ``<name>.q``, ``<name>.k``, ``<name>.v`` of a :class:`SplitQKV`,
which computes exactly what the fused layer computed and is fused back by ``merge``.
"""

from __future__ import annotations

import re

import torch
from torch import nn

SLICES = ("q", "k", "v")


class SplitQKV(nn.Module):
    """Three linear layers ``q``, ``k``, ``v`` whose concatenated outputs equal the fused ``qkv`` layer's.

    Args:
        fused: a linear layer with ``out_features = 3 * d``, rows ``[q; k; v]``.
    """

    def __init__(self, fused: nn.Linear) -> None:
        super().__init__()
        if fused.out_features % 3:
            raise ValueError(f"a fused qkv layer needs out_features divisible by 3, got {fused.out_features}")
        d = fused.out_features // 3
        has_bias = fused.bias is not None
        for i, slice_name in enumerate(SLICES):
            layer = nn.Linear(fused.in_features, d, bias=has_bias).to(fused.weight.device, fused.weight.dtype)
            with torch.no_grad():
                layer.weight.copy_(fused.weight[i * d : (i + 1) * d])
                if has_bias:
                    layer.bias.copy_(fused.bias[i * d : (i + 1) * d])
            layer.weight.requires_grad_(fused.weight.requires_grad)
            if has_bias:
                layer.bias.requires_grad_(fused.bias.requires_grad)
            setattr(self, slice_name, layer)
        self.in_features = fused.in_features
        self.out_features = fused.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[q(x), k(x), v(x)]`` concatenated on the last dimension ``(..., 3d)``."""
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)

    @torch.no_grad()
    def fused(self) -> nn.Linear:
        """One ``nn.Linear(d, 3d)`` equal to this module (its parts must be plain linear layers: merge first)."""
        parts = [getattr(self, s) for s in SLICES]
        if not all(type(p) is nn.Linear for p in parts):
            raise TypeError("SplitQKV.fused needs plain nn.Linear parts: merge the adapters first")
        has_bias = parts[0].bias is not None
        out = nn.Linear(self.in_features, self.out_features, bias=has_bias)
        out = out.to(parts[0].weight.device, parts[0].weight.dtype)
        out.weight.copy_(torch.cat([p.weight for p in parts]))
        if has_bias:
            out.bias.copy_(torch.cat([p.bias for p in parts]))
        return out


def split_qkv(model: nn.Module, pattern: str = r"(^|\.)qkv$") -> list[str]:
    """Replace every ``nn.Linear`` whose name matches ``pattern`` by a :class:`SplitQKV` (in place).

    Returns:
        The names of the split layers (their parts are ``<name>.q``, ``<name>.k``, ``<name>.v``).
    """
    compiled = re.compile(pattern)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and compiled.search(n)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SplitQKV(getattr(parent, child)))
    return names
