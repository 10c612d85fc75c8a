"""Int8 fake quantisation with ONNX Runtime's static QDQ semantics: the formulas and the layer that applies them.

Written by hand from onnxruntime 1.32 (``quantization/quant_utils.py``: ``compute_scale_zp``, ``quantize_nparray``;
``qdq_quantizer.py``; ``base_quantizer.py``: ``quantize_bias_static_impl``), so the PyTorch reference sits on the very
grid ``quantize_static(QDQ, per_channel=True, activation_type=QUInt8, weight_type=QInt8)`` builds. For each
quantised ``Conv``/``Gemm``/``MatMul`` ORT quantises:

* the weight per output channel, symmetric int8: ``s = max|w| / 127`` (computed in float64, stored float32;
  ``s = 1`` when it underflows, e.g. an all-zero channel), ``q = clamp(round(w / s), -128, 127)``;
* the input and the output tensor per tensor, asymmetric uint8: the calibrated ``[lo, hi]`` is widened to contain
  0, ``s = (hi - lo) / 255`` (float64, stored float32; ``1`` when it underflows), ``z = round(-lo / s)``,
  ``q = clamp(round(x / s) + z, 0, 255)``, dequantised ``(q - z) * s``;
* the bias as int32 with scale ``s_in * s_w`` and zero point 0; where that scale would overflow int32, the
  channel's weight scale is raised first (``_adjust_weight_scale_for_int32_bias``).

Rounding is half to even everywhere (numpy, torch and ORT's kernels agree). A ``Linear`` on a 2-D input exports as
``Gemm`` (bias inside, output quantised after it); on an N-D input (tokens) as ``MatMul`` + ``Add``: ORT quantises
the ``MatMul`` output, *before* the float bias is added; :class:`Int8Layer` follows both.

Parity measured against ORT 1.32 (``tests/test_int8.py``, ``scripts/bench_int8.py``): fed ORT's own input, every
layer of ResNet-18 and of timm's ``test_vit`` gives ORT's output codes except where float summation order decides a
rounding tie (at most 1e-5 of the codes, one step each). End to end those rare flips propagate through the next
layers' roundings: logits differ by a relative L2 of 0.013-0.018 on ResNet-18 (quantisation error itself: 0.064),
0 on a small conv/residual/token toy net. Top-1 agreement: 100 % on the test nets; 97-100 % for a random-init
ResNet-18 on random inputs, whose logits are nearly tied (a trained model's margins are far wider).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

WEIGHT_QMIN, WEIGHT_QMAX = -128, 127  # int8 codes; symmetric scales use [-127, 127]
ACT_QMAX = 255  # uint8 codes
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
_TINY = torch.finfo(torch.float32).tiny  # ORT: a scale under float32's smallest normal becomes 1
_BIAS_EPS = 1.0001  # ORT's multiplicative epsilon when raising a weight scale for the int32 bias


def weight_scales(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 scales per output channel ``(C_out,)`` float32 of ``weight (C_out, ...)``."""
    absmax = weight.detach().float().reshape(len(weight), -1).abs().amax(1).double()
    scale = 2 * absmax / (2 * 127)  # ORT: (rmax - rmin) / (qmax - qmin) on [-absmax, absmax] and [-127, 127]
    return torch.where(scale < _TINY, torch.ones_like(scale), scale).float()


def quantize_weight(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Int8 codes (as float) of ``weight (C_out, ...)`` on per-channel ``scales (C_out,)``."""
    s = scales.reshape(-1, *[1] * (weight.dim() - 1))
    return torch.clamp(torch.round(weight / s), WEIGHT_QMIN, WEIGHT_QMAX)  # float32 division, as ORT's numpy


def fake_quantize_weight(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``weight`` rounded to its per-channel int8 grid: ``q * s``."""
    return quantize_weight(weight, scales) * scales.reshape(-1, *[1] * (weight.dim() - 1))


def activation_params(low: float, high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale float32, zero point uint8)`` of the asymmetric uint8 grid of a calibrated range ``[low, high]``."""
    lo = min(float(torch.tensor(low, dtype=torch.float32)), 0.0)  # the range always contains 0
    hi = max(float(torch.tensor(high, dtype=torch.float32)), 0.0)
    scale = (hi - lo) / ACT_QMAX  # float64, as ORT
    if scale < _TINY:
        return torch.tensor(1.0), torch.tensor(0, dtype=torch.uint8)
    zero = round(-lo / scale)  # Python's round is half to even, as numpy's
    return torch.tensor(scale, dtype=torch.float32), torch.tensor(zero, dtype=torch.uint8)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``x`` through ``QuantizeLinear`` then ``DequantizeLinear`` (uint8, per tensor)."""
    z = zero.to(x.dtype)
    return (torch.clamp(torch.round(x / scale) + z, 0, ACT_QMAX) - z) * scale


def quantize_bias(bias: torch.Tensor, input_scale: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Int32 codes (as float64) of ``bias (C_out,)`` on scale ``input_scale * scales`` (zero point 0)."""
    bias_scale = (input_scale * scales).double()  # the float32 product, as ORT's numpy
    return torch.round(bias.detach().double() / bias_scale).clamp(INT32_MIN, INT32_MAX)


def fake_quantize_bias(bias: torch.Tensor, input_scale: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``bias`` on its int32 grid, dequantised as ``DequantizeLinear`` does (``float32(q) * scale``)."""
    return quantize_bias(bias, input_scale, scales).float() * (input_scale * scales)


def bias_safe_scales(scales: torch.Tensor, bias: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """``scales`` with each channel raised where ``input_scale * scale`` would push its bias past int32 (ORT)."""
    qrange = float(INT32_MAX) - float(INT32_MIN + 1)
    smallest = (_BIAS_EPS * (2.0 * bias.detach().float().abs())).double() / qrange
    candidate = input_scale.double() * scales.double()
    raise_it = (candidate < smallest) & (candidate > 0)
    return torch.where(raise_it, (scales.double() * (smallest / candidate)).float(), scales)


class RangeObserver:
    """The min and max of every tensor seen (MinMax calibration); with :meth:`start_histogram`, a histogram of
    the values over that range (second pass, for percentile ranges)."""

    def __init__(self) -> None:
        self.low = float("inf")
        self.high = float("-inf")
        self.hist: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        """Record one tensor."""
        x = x.detach().float()
        if self.hist is None:
            self.low = min(self.low, float(x.min()))
            self.high = max(self.high, float(x.max()))
        elif self.high > self.low:
            self.hist += torch.histc(x, bins=len(self.hist), min=self.low, max=self.high)

    def start_histogram(self, bins: int = 2048) -> None:
        """Switch to counting values in ``bins`` equal bins over ``[low, high]``."""
        self.hist = torch.zeros(bins, dtype=torch.float64)

    def percentile_range(self, percentile: float) -> tuple[float, float]:
        """``[lo, hi]`` keeping ``percentile`` % of the values, cutting the rest equally from both tails."""
        if self.hist is None or self.hist.sum() == 0:
            return self.low, self.high
        cdf = self.hist.cumsum(0) / self.hist.sum()
        cut = (100.0 - percentile) / 200.0
        width = (self.high - self.low) / len(self.hist)
        first = int(torch.searchsorted(cdf, torch.tensor(cut, dtype=torch.float64)))
        last = int(torch.searchsorted(cdf, torch.tensor(1.0 - cut, dtype=torch.float64)))
        return self.low + first * width, min(self.low + (last + 1) * width, self.high)


class Int8Layer(nn.Module):
    """A ``Conv2d`` or ``Linear`` computing what ORT's QDQ form of it computes (see the module docstring).

    The float layer is kept (``layer``; its weight is quantised on the fly); the scales and zero points are
    buffers (``weight_scale (C_out,)``, ``input_scale``/``input_zero_point``, ``output_scale``/``output_zero_point``
    and the calibrated ``input_range``/``output_range``), so a checkpoint stores them and a data-free rebuild
    (a fresh ``Int8Layer(layer)``: placeholders) takes them back. While :attr:`observers` is set the layer runs in
    float and records the ranges of the exact tensors ORT quantises (:meth:`freeze` then sets the grid).
    """

    def __init__(self, layer: nn.Conv2d | nn.Linear) -> None:
        super().__init__()
        if not isinstance(layer, nn.Conv2d | nn.Linear):
            raise TypeError(f"Int8Layer wraps Conv2d or Linear layers, not {type(layer).__name__}")
        self.layer = layer
        channels = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
        self.register_buffer("weight_scale", torch.ones(channels))
        for side in ("input", "output"):
            self.register_buffer(f"{side}_range", torch.zeros(2))
            self.register_buffer(f"{side}_scale", torch.tensor(1.0))
            self.register_buffer(f"{side}_zero_point", torch.tensor(0, dtype=torch.uint8))
        self.observers: tuple[RangeObserver, RangeObserver] | None = None
        self.input_rank = 0  # rank of the inputs seen while observing (2: Gemm, else MatMul for a Linear)

    def _matmul(self, x: torch.Tensor) -> bool:
        """Whether the exported node is a ``MatMul`` + ``Add`` (a Linear on N-D tokens) rather than Conv/Gemm."""
        return isinstance(self.layer, nn.Linear) and x.dim() != 2

    def _apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, weight, bias)
        return F.linear(x, weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantised input, per-channel int8 weight and int32 bias, float accumulation, quantised output."""
        if self.observers is not None:
            return self._observe(x)
        xq = fake_quantize(x, self.input_scale, self.input_zero_point)
        weight = fake_quantize_weight(self.layer.weight, self.weight_scale)
        bias = self.layer.bias
        if self._matmul(x):  # ORT quantises the MatMul output; the bias Add stays float
            y = fake_quantize(self._apply(xq, weight, None), self.output_scale, self.output_zero_point)
            return y if bias is None else y + bias
        if bias is not None:
            bias = fake_quantize_bias(bias, self.input_scale, self.weight_scale)
        return fake_quantize(self._apply(xq, weight, bias), self.output_scale, self.output_zero_point)

    def _observe(self, x: torch.Tensor) -> torch.Tensor:
        """The float layer, recording the ranges of its input and of the output tensor ORT quantises."""
        self.input_rank = x.dim()
        self.observers[0].update(x)
        if self._matmul(x):
            y = self._apply(x, self.layer.weight, None)
            self.observers[1].update(y)
            return y if self.layer.bias is None else y + self.layer.bias
        y = self.layer(x)
        self.observers[1].update(y)
        return y

    @torch.no_grad()
    def freeze(self, input_range: tuple[float, float], output_range: tuple[float, float]) -> None:
        """Set the grid from calibrated ranges: activation scales and zero points, weight scales (raised where
        the int32 bias needs it, unless the bias stays float: a Linear on tokens); stop observing."""
        for side, (low, high) in (("input", input_range), ("output", output_range)):
            getattr(self, f"{side}_range").copy_(torch.tensor([low, high]))
            scale, zero = activation_params(low, high)
            getattr(self, f"{side}_scale").copy_(scale)
            getattr(self, f"{side}_zero_point").copy_(zero)
        scales = weight_scales(self.layer.weight)
        gemm = isinstance(self.layer, nn.Conv2d) or self.input_rank == 2
        if self.layer.bias is not None and gemm:
            scales = bias_safe_scales(scales, self.layer.bias, self.input_scale)
        self.weight_scale.copy_(scales)
        self.observers = None

    def float_module(self) -> nn.Conv2d | nn.Linear:
        """The plain float layer (a copy; BatchNorm already folded in): what the exporter puts in the graph."""
        return copy.deepcopy(self.layer)

    def extra_repr(self) -> str:
        return "int8: weights symmetric per output channel, activations uint8 per tensor"
