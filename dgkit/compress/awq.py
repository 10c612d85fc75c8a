"""Weight-only quantisation links: round-to-nearest (RTN) and activation-aware (AWQ), on transformer linears.

:class:`WeightQuantize` replaces each selected ``nn.Linear`` by a :class:`~dgkit.compress.quantizer.QuantLinear`
(group-wise asymmetric codes, fake-quant evaluation, lossless transcoding to ONNX Runtime's ``MatMulNBits``).

``algorithm: awq`` first searches, per scaling group of each transformer block, a per-input-channel scale
``s = s_X^α / sqrt(max·min)`` (``s_X``: mean ``|x|`` per channel on the source domains' calibration images,
α on a grid in [0, 1)) that minimises the output error of the inspected module once its linears are quantised
as ``Q(W·s)/s``; folds ``1/s`` into the op before and ``s`` into the linears (the float function is unchanged);
then searches a per-(row, group) clipping range on the rescaled inputs. The four groups of a timm ``Block``:

======================  ===================================  ==============  ================
group                   previous op (takes ``1/s``)           balanced        inspected
======================  ===================================  ==============  ================
attention input         ``norm1`` (LayerNorm weight, bias)    ``attn.qkv``    ``attn``
attention output        the V rows of ``attn.qkv``            ``attn.proj``   ``attn.proj``
MLP input               ``norm2``                             ``mlp.fc1``     ``mlp``
MLP output              ``mlp.act`` → :class:`ScaledActivation`  ``mlp.fc2``  ``mlp.fc2``
======================  ===================================  ==============  ================

segment-anything's encoder blocks have the same shape (``mlp.lin1``/``mlp.lin2``); windowed attention pads the
normalised tokens with zeros, which the folding leaves at zero, so the fold stays exact there too.

Clipping is skipped for ``qkv`` (the q·kᵀ product makes its error hard to see from the layer alone). Linears
outside such blocks are quantised by RTN. Written by hand (about 150 lines): llm-awq and AutoAWQ target
language models only, AutoAWQ is deprecated, and neither quantises vision towers.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from dgkit.chain import TransformContext
from dgkit.compress.base import CompressionTransform, set_submodule
from dgkit.compress.calibration import Calibration
from dgkit.compress.quantizer import QuantLinear, fake_quantize, group_size_for

log = logging.getLogger(__name__)

ALGORITHMS = ("rtn", "awq")


class ScaledActivation(nn.Module):
    """``act(x) / s`` per channel: how AWQ folds a scale through a non-homogeneous activation (GELU)."""

    def __init__(self, act: nn.Module, scales: torch.Tensor) -> None:
        super().__init__()
        self.act = act
        self.register_buffer("scales", scales.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The activation, divided by the per-channel scales."""
        return self.act(x) / self.scales.to(x.dtype)


MLP_LINEARS = (("fc1", "fc2"), ("lin1", "lin2"))
"""The MLP's two linears in a transformer block: timm's ``fc1``/``fc2``, segment-anything's ``lin1``/``lin2``."""


def mlp_linears(mlp: nn.Module) -> tuple[str, str] | None:
    """The names of ``mlp``'s input and output linears (:data:`MLP_LINEARS`), or ``None``."""
    for names in MLP_LINEARS:
        if all(isinstance(getattr(mlp, n, None), nn.Linear) for n in names):
            return names
    return None


def is_vit_block(module: nn.Module) -> bool:
    """A transformer block (timm's or SAM's encoder block) whose four AWQ groups can be folded: affine
    LayerNorms, a fused qkv, nothing between the attention's output and ``proj``, an MLP of two linears around
    an activation ``act``."""
    attn, mlp = getattr(module, "attn", None), getattr(module, "mlp", None)
    norms = [getattr(module, "norm1", None), getattr(module, "norm2", None)]
    return (
        all(isinstance(n, nn.LayerNorm) and n.elementwise_affine for n in norms)
        and isinstance(getattr(attn, "qkv", None), nn.Linear)
        and isinstance(getattr(attn, "proj", None), nn.Linear)
        and isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity)
        and getattr(attn, "gate", None) is None
        and mlp_linears(mlp) is not None
        and isinstance(getattr(mlp, "act", None), nn.Module)
        and isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity)
    )


def search_scale(
    x: torch.Tensor, linears: list[nn.Linear], inspect: Callable[[torch.Tensor], torch.Tensor], bits: int,
    groups: list[int], n_grid: int = 20,
) -> tuple[torch.Tensor, float, float, float]:  # fmt: skip
    """AWQ's scale search on one group: ``(scales (K,), best α, error at best α, error at α = 0 i.e. RTN)``.

    Args:
        x: the balanced linears' input ``(..., K)`` on the calibration images.
        linears: layers reading ``x`` (their weights are restored on return).
        inspect: the module whose output error is minimised (called on ``x``).
        groups: each linear's quantisation group size.
    """
    s_x = x.abs().reshape(-1, x.shape[-1]).mean(0)
    originals = [lin.weight.detach().clone() for lin in linears]
    with torch.no_grad():
        reference = inspect(x)
        best = (float("inf"), 0.0, torch.ones_like(s_x))
        rtn_error = float("nan")
        for i in range(n_grid):
            alpha = i / n_grid
            s = s_x.clamp(min=1e-4).pow(alpha)
            s = (s / (s.max() * s.min()).sqrt()).clamp(min=1e-4)
            for lin, w, g in zip(linears, originals, groups):
                lin.weight.copy_(fake_quantize(w * s, bits, g) / s)
            error = float((inspect(x) - reference).float().pow(2).mean())
            if i == 0:
                rtn_error = error
            if error < best[0]:
                best = (error, alpha, s.clone())
        for lin, w in zip(linears, originals):
            lin.weight.copy_(w)
    return best[2], best[1], best[0], rtn_error


def search_clip(weight: torch.Tensor, x: torch.Tensor, bits: int, group: int, n_grid: int = 20,
                max_shrink: float = 0.5, rows_per_batch: int = 64) -> torch.Tensor:  # fmt: skip
    """AWQ's clipping search: per (output row, group), the ``max|w|`` shrink in ``{1, 1 - 1/n, ...}`` (down to
    ``1 - max_shrink``) that minimises the group's output error on inputs ``x (T, K)``; returns the clipped
    weight (float)."""
    n, k = weight.shape
    xg = x.reshape(-1, k // group, group)  # (T, G, g)
    w = weight.reshape(n, k // group, group)
    out = w.clone()
    for start in range(0, n, rows_per_batch):
        wb = w[start : start + rows_per_batch]  # (b, G, g)
        reference = torch.einsum("tgc,bgc->tbg", xg, wb)
        max_abs = wb.abs().amax(-1, keepdim=True)
        best_error = torch.full(max_abs.shape[:2], float("inf"))
        best = wb.clone()
        for i in range(int(max_shrink * n_grid)):
            limit = max_abs * (1 - i / n_grid)
            clipped = wb.clamp(-limit, limit)
            q = fake_quantize(clipped.reshape(-1, k), bits, group).reshape(wb.shape)
            error = (torch.einsum("tgc,bgc->tbg", xg, q) - reference).pow(2).mean(0)  # (b, G)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best = torch.where(better[..., None], clipped, best)
        out[start : start + rows_per_batch] = best
    return out.reshape(n, k)


class WeightQuantize(CompressionTransform):
    """Weight-only W4/W8 quantisation of linears (RTN or AWQ), a chain link (``compress=awq_w4`` etc.).

    Args:
        algorithm: ``awq`` (activation-aware scales and clipping on transformer blocks, RTN elsewhere) or ``rtn``.
        bits: 2..8 (4 and 8 map onto ``MatMulNBits``).
        group: preferred group size along the input; a width it does not divide falls back to 64/32/16, logged.
        n_grid: points of AWQ's α grid in [0, 1).
        clip: AWQ's clipping search (not on ``qkv``).
        max_rows: calibration input rows kept per layer for the searches.
        calibration, include, exclude, default_exclude: see :class:`~dgkit.compress.base.CompressionTransform`.
    """

    layer_types: ClassVar[tuple[type, ...]] = (nn.Linear,)

    def __init__(self, algorithm: str = "awq", bits: int = 4, group: int = 128, n_grid: int = 20, clip: bool = True,
                 max_rows: int = 4096, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(**kwargs)
        if algorithm not in ALGORITHMS:
            raise ValueError(f"compress algorithm={algorithm!r}; choose one of {ALGORITHMS}")
        if not 2 <= bits <= 8:
            raise ValueError(f"compress bits={bits}; weight quantisation supports 2 to 8 bits")
        self.algorithm, self.bits, self.group = algorithm, int(bits), int(group)
        self.n_grid, self.clip, self.max_rows = int(n_grid), bool(clip), int(max_rows)

    # ---- the link ---------------------------------------------------------------------------------------
    def transform(self, model: nn.Module, context: TransformContext) -> dict[str, Any]:
        """Quantise the selected linears of ``model`` in place; return the layers, scaled activations, the
        calibration record and a report (AWQ: α and output error against RTN per group, logits error)."""
        self.prepare(model)
        names = self.layers(model)
        groups = {n: group_size_for(model.get_submodule(n).in_features, self.group, n) for n in names}
        state: dict[str, Any] = {"layers": {n: {"bits": self.bits, "group": g} for n, g in groups.items()},
                                 "scaled_activations": {}, "report": {"algorithm": self.algorithm}}  # fmt: skip
        if self.algorithm == "awq":
            calibration = self.calibrate(context)
            state["calibration"] = calibration.record()
            reference = copy.deepcopy(model)
            self._awq(model, names, groups, calibration, state)
            state["report"]["logits_error"] = self._logits_errors(reference, model, names, groups, calibration)
        for name in names:
            set_submodule(model, name, QuantLinear.from_linear(model.get_submodule(name), self.bits, groups[name]))
        state["report"]["layers"] = len(names)
        return state

    def replay(self, model: nn.Module, state: dict[str, Any]) -> None:
        """Rebuild the quantised structure (empty codes, scaled activations) for a checkpoint to fill."""
        self.prepare(model)
        for name, channels in state.get("scaled_activations", {}).items():
            set_submodule(model, name, ScaledActivation(model.get_submodule(name), torch.ones(int(channels))))
        for name, spec in state["layers"].items():
            set_submodule(model, name, QuantLinear.empty(model.get_submodule(name), spec["bits"], spec["group"]))

    # ---- AWQ --------------------------------------------------------------------------------------------
    def _awq(self, model: nn.Module, names: list[str], groups: dict[str, int], calibration: Calibration,
             state: dict[str, Any]) -> None:  # fmt: skip
        blocks = [(n, m) for n, m in model.named_modules() if is_vit_block(m)]
        inputs = self._block_inputs(model, [m for _, m in blocks], calibration)
        report = state["report"].setdefault("groups", {})
        selected = set(names)
        for (prefix, block), captured in zip(blocks, inputs):
            for key, prev, linear_name, inspect, x in self._groups(block, captured):
                full = f"{prefix}.{linear_name}"
                if full not in selected:
                    continue
                linear = block.get_submodule(linear_name)
                x = x[: self.max_rows]
                s, alpha, error, rtn_error = search_scale(x, [linear], inspect, self.bits, [groups[full]], self.n_grid)
                self._fold(block, prev, linear, s, prefix, state)
                if self.clip and not linear_name.endswith("qkv"):
                    rows = (x / s).reshape(-1, x.shape[-1])[: self.max_rows]
                    with torch.no_grad():
                        linear.weight.copy_(search_clip(linear.weight, rows, self.bits, groups[full], self.n_grid))
                report[f"{prefix}.{key}"] = {"alpha": alpha, "error": error, "rtn_error": rtn_error}

    @torch.no_grad()
    def _block_inputs(self, model: nn.Module, blocks: list[nn.Module], calibration: Calibration) -> list[dict]:
        """Per block, the float inputs of its four groups (``attn``, ``proj``, ``mlp``, ``fc2``) on the
        calibration images, captured in one pass of the unquantised model."""
        captured: list[dict[str, list[torch.Tensor]]] = [{} for _ in blocks]
        handles = []
        for i, block in enumerate(blocks):
            fc2 = block.mlp.get_submodule(mlp_linears(block.mlp)[1])
            for key, module in (("attn", block.attn), ("proj", block.attn.proj), ("mlp", block.mlp), ("fc2", fc2)):

                def hook(_m, args, i=i, key=key):
                    captured[i].setdefault(key, []).append(args[0].detach())

                handles.append(module.register_forward_pre_hook(hook))
        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            for _, x, _ in calibration.batches():
                model(x.to(device))
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        return [{k: torch.cat(v) for k, v in c.items()} for c in captured]

    @staticmethod
    def _groups(block: nn.Module, x: dict[str, torch.Tensor]):
        """``(name, previous op, balanced linear, inspected module, its input)`` for the block's four groups."""
        fc1, fc2 = mlp_linears(block.mlp)
        yield "attn_in", "norm1", "attn.qkv", block.attn, x["attn"]
        yield "attn_out", "attn.qkv", "attn.proj", block.attn.proj, x["proj"]
        yield "mlp_in", "norm2", f"mlp.{fc1}", block.mlp, x["mlp"]
        yield "mlp_out", "mlp.act", f"mlp.{fc2}", block.mlp.get_submodule(fc2), x["fc2"]

    @staticmethod
    @torch.no_grad()
    def _fold(block: nn.Module, prev: str, linear: nn.Linear, s: torch.Tensor, prefix: str, state: dict) -> None:
        """Divide the previous op's output by ``s`` and multiply the linear's input columns by ``s``."""
        op = block.get_submodule(prev)
        if isinstance(op, nn.LayerNorm):
            op.weight.div_(s)
            op.bias.div_(s)
        elif isinstance(op, nn.Linear):  # the V rows of a fused qkv: the last len(s) outputs
            op.weight[-len(s) :].div_(s[:, None])
            if op.bias is not None:
                op.bias[-len(s) :].div_(s)
        else:  # an activation (GELU is not positively homogeneous): an explicit per-channel division
            set_submodule(block, prev, ScaledActivation(op, s))
            state["scaled_activations"][f"{prefix}.{prev}"] = len(s)
        linear.weight.mul_(s[None, :])

    def _logits_errors(self, reference: nn.Module, model: nn.Module, names: list[str], groups: dict[str, int],
                       calibration: Calibration) -> dict[str, float]:  # fmt: skip
        """Relative L2 error of the logits on the calibration images, AWQ's against RTN's at the same bits."""
        rtn = copy.deepcopy(reference)
        awq = copy.deepcopy(model)
        for net, source in ((rtn, rtn), (awq, awq)):
            for name in names:
                set_submodule(net, name, QuantLinear.from_linear(source.get_submodule(name), self.bits, groups[name]))
        errors = {"awq": 0.0, "rtn": 0.0}
        with torch.no_grad():
            for net in (reference, rtn, awq):
                net.eval()
            num = {"awq": 0.0, "rtn": 0.0}
            den = 0.0
            device = next(reference.parameters()).device
            for _, x, _ in calibration.batches():
                x = x.to(device)
                y = reference(x)
                den += float(y.pow(2).sum())
                num["awq"] += float((awq(x) - y).pow(2).sum())
                num["rtn"] += float((rtn(x) - y).pow(2).sum())
        for key in errors:
            errors[key] = (num[key] / max(den, 1e-12)) ** 0.5
        return errors
