"""Group-wise asymmetric weight quantisation (the "W4 g128" grid) and the fake-quant linear layer that holds it.

A weight ``W (N out, K in)`` is quantised in groups of ``group`` consecutive input columns per output row:
``scale = (max - min).clamp(1e-5) / (2^bits - 1)``, ``zero = clamp(-round(min / scale), 0, 2^bits - 1)``,
``q = clamp(round(W / scale) + zero, 0, 2^bits - 1)``, dequantised ``(q - zero) * scale``. This is AWQ's quantiser
and ONNX Runtime's ``MatMulNBits`` semantics (block along K, per-block scale and uint zero point), so the codes
written here transcode losslessly into that kernel (:mod:`dgkit.export.onnx`).

Written by hand: the quantiser is ten lines, and the libraries that carry one (AutoAWQ, torchao) either are
deprecated, assert on group sizes that do not divide ViT-Tiny widths, or need GPU kernels on this stack.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

GROUP_FALLBACKS = (128, 64, 32, 16)


def group_size_for(in_features: int, preferred: int = 128, name: str = "") -> int:
    """The largest of ``preferred`` and its fallbacks (64, 32, 16) that divides ``in_features``; says so when it
    falls back.

    Raises:
        ValueError: no candidate divides ``in_features``.
    """
    candidates = [preferred] + [g for g in GROUP_FALLBACKS if g < preferred]
    for g in candidates:
        if in_features % g == 0:
            if g != preferred:
                log.info("%s: group size %d does not divide %d input features; using %d", name, preferred,
                         in_features, g)  # fmt: skip
            return g
    raise ValueError(f"{name}: no group size in {candidates} divides its {in_features} input features")


def quantize_groups(weight: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes (N, K) uint8, scales (N, K/group), zeros (N, K/group) uint8)`` of ``weight (N, K)``.

    Raises:
        ValueError: ``group`` does not divide K, or ``bits`` outside 2..8.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits}: weight quantisation supports 2 to 8 bits")
    n, k = weight.shape
    if k % group:
        raise ValueError(f"group size {group} does not divide the {k} input features")
    w = weight.detach().float().reshape(n, k // group, group)
    qmax = 2**bits - 1
    low, high = w.amin(-1), w.amax(-1)
    scales = (high - low).clamp(min=1e-5) / qmax
    zeros = (-torch.round(low / scales)).clamp(0, qmax)
    codes = (torch.round(w / scales[..., None]) + zeros[..., None]).clamp(0, qmax)
    return codes.reshape(n, k).to(torch.uint8), scales, zeros.to(torch.uint8)


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The float weight ``(codes - zero) * scale`` of :func:`quantize_groups`' output, shape ``(N, K)``."""
    n, k = codes.shape
    groups = scales.shape[1]
    q = codes.float().reshape(n, groups, k // groups)
    return ((q - zeros.float()[..., None]) * scales[..., None]).reshape(n, k)


def fake_quantize(weight: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """``weight`` rounded to its group-wise grid (float, same shape): the quantiser's reference output."""
    return dequantize_groups(*quantize_groups(weight, bits, group)).to(weight.dtype)


class QuantLinear(nn.Module):
    """A linear layer whose weight is stored as group-wise integer codes (the fake-quant evaluation path).

    The forward pass dequantises the codes and runs a float matmul, so it computes exactly what the integer
    kernel (``MatMulNBits``) computes, up to float rounding. ``codes``, ``scales`` and ``zeros`` are buffers, so
    a checkpoint stores the quantised model and a data-free rebuild (:meth:`empty`) takes them back.
    """

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: torch.Tensor | None,
                 bits: int) -> None:  # fmt: skip
        super().__init__()
        self.bits = bits
        self.out_features, self.in_features = codes.shape
        self.group = self.in_features // scales.shape[1]
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group: int) -> QuantLinear:
        """Quantise ``linear``'s current weight (round to nearest on its own min-max grid)."""
        return cls(*quantize_groups(linear.weight, bits, group), linear.bias, bits)

    @classmethod
    def empty(cls, linear: nn.Linear, bits: int, group: int) -> QuantLinear:
        """A layer of ``linear``'s shape with zero codes, for a rebuild whose buffers a checkpoint then fills."""
        n, k = linear.weight.shape
        codes = torch.zeros(n, k, dtype=torch.uint8)
        scales, zeros = torch.ones(n, k // group), torch.zeros(n, k // group, dtype=torch.uint8)
        return cls(codes, scales, zeros, linear.bias, bits)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight ``(out, in)``."""
        return dequantize_groups(self.codes, self.scales, self.zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ dequantised(W).T + bias``."""
        return nn.functional.linear(x, self.weight.to(x.dtype), self.bias)

    def float_module(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the dequantised weight (the float graph an exporter starts from)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            out.weight.copy_(self.weight)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group={self.group}"
