"""Static int8 quantisation of convolutions and linears (W8A8), the PyTorch twin of ONNX Runtime's QDQ form.

:class:`Int8Quantize` is a compression link: it wraps each selected ``Conv2d``/``Linear`` in an
:class:`~dgkit.compress.int8_layer.Int8Layer` (int8 symmetric per-output-channel weights, uint8 asymmetric
per-tensor input and output, int32 bias), with activation ranges calibrated on the source domains (MinMax as ORT's
``MinMaxCalibrater``, or a percentile of a histogram), so the fake-quant model is the reference
:func:`dgkit.export.qdq.quantize_qdq`'s ORT model is checked against.

A ``BatchNorm2d`` reading a selected convolution's output is folded into it first (eval statistics): the exporter
folds it anyway, and ORT quantises the folded weight and the conv+BN output, so the fake quantisation must see
the same tensors. Pairs are found by hooks (the BN's input *is* the conv's output, not modified in place) and the
fold is verified on a calibration batch; a data-free replay repeats the recorded folds.

Written by hand: the grid must be ORT's (:mod:`dgkit.compress.int8_layer`), which neither torch.ao nor torchao
reproduce (their observers use other range and zero-point rules), and the layer selection, calibration and replay
are the chain's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dgkit.chain import TransformContext
from dgkit.compress.base import DEFAULT_EXCLUDE, CompressionTransform, set_submodule
from dgkit.compress.calibration import Calibration
from dgkit.compress.int8_layer import Int8Layer, RangeObserver

OPS = {"conv": nn.Conv2d, "linear": nn.Linear}
METHODS = ("minmax", "percentile")
_FOLD_CHECK_IMAGES = 8


def _device(model: nn.Module) -> torch.device:
    """Where the model's parameters live (calibration batches go there)."""
    return next(model.parameters()).device


# ---- BatchNorm folding -------------------------------------------------------------------------------------------
@torch.no_grad()
def conv_batchnorm_pairs(model: nn.Module, convs: Sequence[str], x: torch.Tensor) -> dict[str, str]:
    """``{conv: batchnorm}`` for each of ``convs`` whose output goes straight into a ``BatchNorm2d`` with running
    statistics (the BN's input is the conv's output tensor, unmodified), found by one forward pass of ``x``."""
    modules = dict(model.named_modules())
    produced: dict[int, tuple[str, torch.Tensor, int]] = {}
    pairs: dict[str, str] = {}

    def after_conv(name: str):
        def hook(_m: nn.Module, _i: tuple, out: torch.Tensor) -> None:
            produced[id(out)] = (name, out, out._version)

        return hook

    def before_bn(name: str):
        def hook(_m: nn.Module, inputs: tuple) -> None:
            hit = produced.get(id(inputs[0]))
            if hit is not None and hit[1] is inputs[0] and inputs[0]._version == hit[2]:
                pairs.setdefault(hit[0], name)

        return hook

    batchnorms = [n for n, m in modules.items() if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None]
    handles = [modules[n].register_forward_hook(after_conv(n)) for n in convs if isinstance(modules[n], nn.Conv2d)]
    handles += [modules[n].register_forward_pre_hook(before_bn(n)) for n in batchnorms]
    try:
        model(x.to(_device(model)))
    finally:
        for h in handles:
            h.remove()
    return pairs


@torch.no_grad()
def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold eval-mode ``bn`` into ``conv`` in place: ``W * g / sd``, ``(b - mean) * g / sd + beta``."""
    factor = (bn.running_var + bn.eps).rsqrt()
    if bn.weight is not None:
        factor = factor * bn.weight
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    bias = (bias - bn.running_mean) * factor + (bn.bias if bn.bias is not None else 0)
    conv.weight.mul_(factor.reshape(-1, 1, 1, 1))
    conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)


def fold_structure(model: nn.Module, pairs: dict[str, str]) -> None:
    """The folded structure without values (replay): each conv of ``pairs`` gets a bias, its BN becomes Identity."""
    for conv_name, bn_name in pairs.items():
        conv = model.get_submodule(conv_name)
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels), requires_grad=conv.weight.requires_grad)
        set_submodule(model, bn_name, nn.Identity())


@torch.no_grad()
def fold_batchnorms(model: nn.Module, convs: Sequence[str], x: torch.Tensor) -> dict[str, str]:
    """Fold every BN that reads one of ``convs`` into it (``model`` in eval mode); return the pairs.

    Raises:
        RuntimeError: the folded model's outputs on ``x`` differ from the original's (a conv output read by more
            than its BatchNorm): the fold, and ORT's, would change the model.
    """
    pairs = conv_batchnorm_pairs(model, convs, x)
    if not pairs:
        return pairs
    x = x.to(_device(model))
    before = model(x)
    for conv_name, bn_name in pairs.items():
        fold_batchnorm(model.get_submodule(conv_name), model.get_submodule(bn_name))
        set_submodule(model, bn_name, nn.Identity())
    after = model(x)
    tolerance = 1e-4 * float(before.abs().max()) + 1e-5
    if float((after - before).abs().max()) > tolerance:
        raise RuntimeError(
            f"folding BatchNorms into {sorted(pairs)} changed the model's outputs by "
            f"{float((after - before).abs().max()):.3g}: a convolution's output is read by more than its BatchNorm; "
            "exclude that convolution (exclude=[...])"
        )
    return pairs


# ---- calibration -------------------------------------------------------------------------------------------------
@torch.no_grad()
def observe_ranges(model: nn.Module, layers: dict[str, Int8Layer], calibration: Calibration, method: str = "minmax",
                   percentile: float = 99.99, batch_size: int = 64) -> dict[str, dict[str, list[float]]]:  # fmt: skip
    """``{layer: {"input": [lo, hi], "output": [lo, hi]}}`` over the calibration images, every layer observing
    the float model at once (as ORT's calibrator runs the float graph); ``percentile`` takes a second pass."""
    for layer in layers.values():
        layer.observers = (RangeObserver(), RangeObserver())
    passes = 2 if method == "percentile" else 1
    for p in range(passes):
        if p == 1:
            for layer in layers.values():
                for observer in layer.observers:
                    observer.start_histogram()
        for _, x, _ in calibration.batches(batch_size):
            model(x.to(_device(model)))
    ranges = {}
    for name, layer in layers.items():
        if layer.observers[0].low > layer.observers[0].high:
            raise RuntimeError(f"int8: layer {name} never ran on the calibration images; exclude it (exclude=[...])")
        sides = dict(zip(("input", "output"), layer.observers))
        if method == "percentile":
            ranges[name] = {side: list(o.percentile_range(percentile)) for side, o in sides.items()}
        else:
            ranges[name] = {side: [o.low, o.high] for side, o in sides.items()}
    return ranges


# ---- the link ----------------------------------------------------------------------------------------------------
class Int8Quantize(CompressionTransform):
    """Static W8A8 quantisation of convolutions and linears with ONNX Runtime's QDQ grid (see the module docstring).

    Args:
        calibration: ``images_per_domain`` (64), ``allow_target`` (false), ``seed`` (0).
        include: layer patterns to quantise (``None``: every layer of ``ops`` under the backbone and head).
        exclude: more layer patterns to leave in float.
        default_exclude: left in float unless removed: the head and the patch embedding.
        name: the variant's name (see :class:`~dgkit.compress.base.CompressionTransform`).
        ops: the layer kinds to quantise: ``conv`` (``Conv2d``), ``linear`` (``Linear``).
        method: activation ranges: ``minmax`` (ORT's default calibrator) or ``percentile``.
        percentile: the share of values the ``percentile`` range keeps (tails cut equally), in (50, 100].
        batch_size: calibration batch size.

    The recorded state: ``layers`` (names), ``folded`` (``{conv: batchnorm}``), ``ranges``
    (``{layer: {"input": [lo, hi], "output": [lo, hi]}}``, what :func:`~dgkit.export.qdq.quantize_qdq` pins ORT
    to), ``method``, ``calibration`` (domains, counts, allow_target) and ``report`` (layer count, bits, scheme).
    """

    def __init__(self, calibration: dict[str, Any] | None = None, include: Sequence[str] | None = None,
                 exclude: Sequence[str] = (), default_exclude: Sequence[str] = DEFAULT_EXCLUDE,
                 name: str | None = None, ops: Sequence[str] = ("conv", "linear"), method: str = "minmax",
                 percentile: float = 99.99, batch_size: int = 64) -> None:  # fmt: skip
        super().__init__(calibration, include, exclude, default_exclude, name)
        unknown = [o for o in ops if o not in OPS]
        if unknown or not ops:
            raise ValueError(f"int8 ops={list(ops)}: choose from {list(OPS)}")
        if method not in METHODS:
            raise ValueError(f"int8 method={method!r}; choose one of {METHODS}")
        if not 50.0 < float(percentile) <= 100.0:
            raise ValueError(f"int8 percentile={percentile} must be in (50, 100]")
        self.ops = list(ops)
        self.layer_types = tuple(OPS[o] for o in ops)
        self.method = method
        self.percentile = float(percentile)
        self.batch_size = int(batch_size)

    def transform(self, model: nn.Module, context: TransformContext) -> dict[str, Any]:
        """Fold BatchNorms, wrap the selected layers, calibrate their ranges on the source domains, freeze."""
        self.prepare(model)
        names = self.layers(model)
        calibration = self.calibrate(context)
        was_training = model.training
        model.eval()
        try:
            first = next(iter(calibration.images.values()))[:_FOLD_CHECK_IMAGES]
            folded = fold_batchnorms(model, names, first)
            layers = self._wrap(model, names)
            ranges = observe_ranges(model, layers, calibration, self.method, self.percentile, self.batch_size)
            for name, layer in layers.items():
                layer.freeze(ranges[name]["input"], ranges[name]["output"])
        finally:
            model.train(was_training)
        return {
            "layers": names,
            "folded": folded,
            "ranges": ranges,
            "method": self.method,
            "calibration": calibration.record(),
            "report": self.report(names, folded),
        }

    def replay(self, model: nn.Module, state: dict[str, Any]) -> None:
        """Rebuild the folded, wrapped structure with placeholder grids (the checkpoint's buffers fill them)."""
        self.prepare(model)
        fold_structure(model, dict(state.get("folded") or {}))
        self._wrap(model, state["layers"])

    @staticmethod
    def _wrap(model: nn.Module, names: Sequence[str]) -> dict[str, Int8Layer]:
        layers = {name: Int8Layer(model.get_submodule(name)) for name in names}
        for name, layer in layers.items():
            set_submodule(model, name, layer)
        return layers

    def report(self, names: Sequence[str], folded: dict[str, str]) -> dict[str, Any]:
        """What the variant's tables and manifest show."""
        return {
            "layers": len(names),
            "bits": {"weights": 8, "activations": 8, "bias": 32},
            "scheme": "W int8 symmetric per output channel, A uint8 asymmetric per tensor (ORT static QDQ)",
            "method": self.method if self.method == "minmax" else f"percentile {self.percentile}",
            "folded_batchnorms": len(folded),
        }
