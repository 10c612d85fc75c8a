"""ONNX export of an inference model, with quantised linears transcoded losslessly into ONNX Runtime's
``com.microsoft::MatMulNBits``.

:func:`export_onnx` exports :meth:`~dgkit.methods.base.Method.to_inference` with the dynamo exporter
(``torch.onnx.export(dynamo=True)``, one file, input ``input (batch, C, H, W)``, output ``logits``, dynamic batch).
Compression modules declare how to leave the graph by a ``float_module()`` method (:class:`FloatConvertible`);
every such submodule is replaced by its float module first, so the exporter only sees plain layers. Then each
:class:`~dgkit.compress.quantizer.QuantLinear` is found in the graph (the ``MatMul``/``Gemm`` whose constant weight
equals its dequantised weight, preferring the node the exporter scoped under the layer's name) and rewritten
into ``MatMulNBits`` built from the layer's own integer codes, scales and zero points.

Hand-written on purpose: ONNX Runtime's ``MatMulNBitsQuantizer`` would quantise the float weights again and
re-derive the grid (round to nearest on its own min-max), which is not the grid AWQ's scaled and clipped search
chose; transcoding the codes keeps the runtime on the PyTorch fake-quant reference's exact grid (relative logit
error ~3e-7 on ViT-Tiny, float rounding only). The packing follows
the contrib-op schema of onnxruntime 1.32: ``B uint8 (N, k_blocks, block_size * bits / 8)``, codes packed low bits
first along K; ``scales (N, k_blocks)`` in A's dtype; ``zero_points uint8 (N, ceil(k_blocks * bits / 8))`` packed
the same way; dequantised ``(q - zero_point) * scale``. Codes of 3 bits are stored as 4-bit, 5 to 7 bits as 8-bit
(the kernel has 2, 4 and 8), and a group that is a multiple of a power-of-two block repeats its scale over its
blocks: both lossless.
"""

from __future__ import annotations

import ast
import copy
import io
import logging
import warnings
from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from dgkit.compress.quantizer import QuantLinear

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MS_DOMAIN = "com.microsoft"
KERNEL_BITS = (2, 4, 8)
MIN_BLOCK = 16
_NAME_SCOPES = "pkg.torch.onnx.name_scopes"


@runtime_checkable
class FloatConvertible(Protocol):
    """A compression module that hands the exporter a plain float module to start from: a ``QuantLinear`` its
    ``nn.Linear`` with the dequantised weight (the same function), an int8 layer its float layer (which the QDQ
    pass then quantises on the link's grid)."""

    def float_module(self) -> nn.Module:
        """The plain float module."""


@dataclass
class NBitsLayer:
    """One ``QuantLinear`` rewritten into ``MatMulNBits`` (recorded in the manifest).

    Attributes:
        layer: the module name in the inference model.
        node: the graph node it replaced.
        bits: the layer's code width; ``kernel_bits`` the width stored (2, 4 or 8).
        group: the layer's quantisation group; ``block_size`` the kernel's block (a power of two dividing it).
    """

    layer: str
    node: str
    bits: int
    kernel_bits: int
    group: int
    block_size: int
    in_features: int
    out_features: int


# ---- the float graph ---------------------------------------------------------------------------------------------
def float_graph(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every :class:`FloatConvertible` submodule replaced by its float module."""
    model = copy.deepcopy(model).eval()
    if isinstance(model, FloatConvertible):
        return model.float_module().eval()
    _replace_float_modules(model)
    return model


def _replace_float_modules(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, FloatConvertible):
            setattr(module, name, child.float_module())
        else:
            _replace_float_modules(child)


def to_onnx(model: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    """The ONNX graph of ``model`` (a float module: see :func:`float_graph`), dynamic batch, weights inside.

    ``example`` should hold at least two images: ``torch.export`` specialises a batch of one to a constant.
    """
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (example,), None, dynamo=True, external_data=False, optimize=True, verbose=False,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},),
        )  # fmt: skip
    return program.model_proto


# ---- MatMulNBits packing -----------------------------------------------------------------------------------------
def kernel_bits(bits: int) -> int:
    """The narrowest ``MatMulNBits`` width (2, 4, 8) that holds ``bits``-bit codes."""
    for width in KERNEL_BITS:
        if bits <= width:
            return width
    raise ValueError(f"bits={bits}: MatMulNBits stores at most 8-bit codes")


def block_size_for(group: int) -> int:
    """The largest power of two (>= 16) dividing ``group``: the kernel block that keeps one scale per group.

    Raises:
        ValueError: no power of two >= 16 divides ``group``.
    """
    block = group & -group  # the largest power of two dividing group
    if block < MIN_BLOCK:
        raise ValueError(
            f"group size {group}: MatMulNBits needs a power-of-two block >= {MIN_BLOCK} that divides the group "
            "(quantise with group 16, 32, 64 or 128)"
        )
    return block


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-bit integers along the last axis into bytes, low bits first (zero-padded)."""
    per_byte = 8 // bits
    pad = (-values.shape[-1]) % per_byte
    v = np.pad(values.astype(np.uint8), [(0, 0)] * (values.ndim - 1) + [(0, pad)])
    v = v.reshape(*v.shape[:-1], -1, per_byte)
    packed = np.zeros(v.shape[:-1], dtype=np.uint8)
    for j in range(per_byte):
        packed |= (v[..., j] << (bits * j)).astype(np.uint8)
    return packed


def nbits_tensors(layer: QuantLinear) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """``({"B", "scales", "zero_points"}, attributes)`` of ``MatMulNBits`` for ``layer``, from its own codes."""
    bits, block = kernel_bits(layer.bits), block_size_for(layer.group)
    repeat = layer.group // block  # kernel blocks per quantisation group
    n, k = layer.codes.shape
    codes = layer.codes.cpu().numpy().reshape(n, k // block, block)  # (N, k_blocks, block)
    scales = layer.scales.detach().cpu().float().numpy().repeat(repeat, axis=1)  # (N, k_blocks)
    zeros = layer.zeros.cpu().numpy().repeat(repeat, axis=1)  # (N, k_blocks)
    tensors = {
        "B": pack_bits(codes, bits),
        "scales": np.ascontiguousarray(scales),
        "zero_points": pack_bits(zeros, bits),
    }
    return tensors, {"K": k, "N": n, "bits": bits, "block_size": block}


# ---- finding and rewriting the linears ---------------------------------------------------------------------------
def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _scope(node: onnx.NodeProto) -> str:
    """The module the exporter recorded ``node`` under (``backbone.model.head``), or ``""``."""
    for prop in node.metadata_props:
        if prop.key == _NAME_SCOPES:
            scopes = ast.literal_eval(prop.value)  # ['', 'backbone', 'backbone.model', ..., 'linear'] (op last)
            return scopes[-2] if len(scopes) >= 2 else ""
    return ""


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """The graph's constant tensors: initializers, and 2-D transposes of them (the exporter folds a weight's
    transpose into a new initializer, except for a weight two nodes read, where one ``Transpose`` stays)."""
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Transpose" and node.input[0] in constants and constants[node.input[0]].ndim == 2:
            if list(_attributes(node).get("perm", [1, 0])) == [1, 0]:
                constants[node.output[0]] = constants[node.input[0]].T
    return constants


def _linear_weight(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> np.ndarray | None:
    """The ``(N, K)`` weight of a ``MatMul``/``Gemm`` node computing ``A @ W.T`` with a constant ``W``, else None."""
    if len(node.input) < 2 or node.input[1] not in constants:
        return None
    b = constants[node.input[1]]
    if b.ndim != 2:
        return None
    if node.op_type == "MatMul":
        return b.T
    if node.op_type == "Gemm":
        attrs = _attributes(node)
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            return None
        return b if attrs.get("transB", 0) else b.T
    return None


def _add_nbits_weights(layer: QuantLinear, name: str, graph: onnx.GraphProto) -> tuple[list[str], dict[str, int]]:
    """Add ``layer``'s ``MatMulNBits`` initializers to ``graph``; return their names (B, scales, zero points) and
    the node attributes."""
    tensors, attrs = nbits_tensors(layer)
    names = [f"{name}.nbits.{key}" for key in ("B", "scales", "zero_points")]
    graph.initializer.extend(numpy_helper.from_array(tensors[key.rsplit(".", 1)[1]], key) for key in names)
    return names, attrs


def _nbits_nodes(node: onnx.NodeProto, weights: list[str], attrs: dict[str, int], name: str) -> list[onnx.NodeProto]:
    """The ``MatMulNBits`` node (plus the bias ``Add`` a ``Gemm`` had) replacing ``node``."""
    has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]
    output = f"{node.output[0]}_nbits" if has_bias else node.output[0]
    nodes = [helper.make_node("MatMulNBits", [node.input[0], *weights], [output], name=f"{node.name}.{name}.nbits",
                              domain=MS_DOMAIN, **attrs)]  # fmt: skip
    if has_bias:
        nodes.append(
            helper.make_node("Add", [output, node.input[2]], [node.output[0]], name=f"{node.name}.{name}.bias")
        )
    return nodes


def _matching_nodes(name: str, weight: np.ndarray, linears: dict[int, np.ndarray], graph: onnx.GraphProto) -> list[int]:
    """The free nodes carrying ``weight``: every one the exporter scoped under ``name`` (a layer called twice has
    two), else the first one anywhere (the weight, not the name, is what makes the rewrite exact)."""
    same = [i for i, w in linears.items() if w.shape == weight.shape]
    named = [i for i in same if _scope(graph.node[i]) == name and np.array_equal(linears[i], weight)]
    return named or [i for i in same if np.array_equal(linears[i], weight)][:1]


def transcode_quant_linears(proto: onnx.ModelProto, model: nn.Module) -> list[NBitsLayer]:
    """Rewrite, in place, the nodes of every :class:`QuantLinear` of ``model`` into ``MatMulNBits``.

    ``proto`` is the graph of :func:`float_graph` of ``model``. The replaced float weights are dropped.

    Raises:
        RuntimeError: a ``QuantLinear`` whose weight no ``MatMul``/``Gemm`` of the graph carries.
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not layers:
        return []
    graph = proto.graph
    constants = _constants(graph)
    linears = {i: w for i, node in enumerate(graph.node) if (w := _linear_weight(node, constants)) is not None}
    replaced: dict[int, list[onnx.NodeProto]] = {}
    done = []
    for name, layer in layers:
        weight = layer.weight.detach().cpu().float().numpy()
        found = _matching_nodes(name, weight, {i: w for i, w in linears.items() if i not in replaced}, graph)
        if not found:
            raise RuntimeError(
                f"{name} ({type(layer).__name__}): no MatMul/Gemm of the exported graph holds its dequantised weight "
                f"{tuple(weight.shape)}; cannot transcode it into MatMulNBits"
            )
        weights, attrs = _add_nbits_weights(layer, name, graph)
        for i in found:
            replaced[i] = _nbits_nodes(graph.node[i], weights, attrs, name)
            done.append(NBitsLayer(name, graph.node[i].name, layer.bits, attrs["bits"], layer.group,
                                   attrs["block_size"], layer.in_features, layer.out_features))  # fmt: skip
    old_weights = {graph.node[i].input[1] for i in replaced}
    nodes = [n for i, node in enumerate(graph.node) for n in replaced.get(i, [node])]
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused(graph, old_weights)
    if not any(op.domain == MS_DOMAIN for op in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return done


def _drop_unused(graph: onnx.GraphProto, names: set[str]) -> None:
    """Remove the tensors of ``names`` (initializers, or ``Transpose`` nodes of them) that nothing reads any more."""
    names = set(names)
    while True:
        used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type == "Transpose" and n.output[0] in names and n.output[0] not in used]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
            names.update(node.input)
    keep = [t for t in graph.initializer if t.name not in names or t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


# ---- the whole export --------------------------------------------------------------------------------------------
@dataclass
class OnnxGraphs:
    """What :func:`export_onnx` produced.

    Attributes:
        float: the float graph (every compression module as its float module), the eager-parity reference.
        final: the shipped graph (``float`` with quantised linears as ``MatMulNBits``; ``float`` itself if none).
        nbits: the transcoded layers.
    """

    float: onnx.ModelProto
    final: onnx.ModelProto
    nbits: list[NBitsLayer]

    def nbits_records(self) -> list[dict]:
        """The transcoded layers as plain dicts (for the manifest)."""
        return [asdict(layer) for layer in self.nbits]


def export_onnx(model: nn.Module, example: torch.Tensor) -> OnnxGraphs:
    """Export an inference model (``method.to_inference()``) to ONNX; quantised linears become ``MatMulNBits``."""
    float_proto = to_onnx(float_graph(model), example)
    final = onnx.ModelProto()
    final.CopyFrom(float_proto)
    nbits = transcode_quant_linears(final, model)
    if nbits:
        log.info("%d quantised linears transcoded into MatMulNBits", len(nbits))
    return OnnxGraphs(float_proto, final if nbits else float_proto, nbits)


def model_bytes(proto: onnx.ModelProto) -> bytes:
    """``proto`` serialised as one file (weights inside; graphs over 2 GB would need external data)."""
    buffer = io.BytesIO()
    onnx.save_model(proto, buffer)
    return buffer.getvalue()
