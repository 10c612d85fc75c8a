"""The static int8 QDQ ONNX model of an :class:`~dgkit.compress.int8.Int8Quantize` link, made by ONNX Runtime's
``quantize_static`` and pinned to the link's grid.

:func:`quantize_qdq` takes the float graph the exporter wrote (every ``Int8Layer`` swapped for its float layer) and
runs ``quantize_static`` in QDQ format: int8 per-channel symmetric weights, uint8 per-tensor activations, int32
biases, MinMax calibration on the given source images through a ``CalibrationDataReader``,
``op_types_to_quantize=["Conv", "MatMul", "Gemm"]`` and ``nodes_to_quantize`` = the nodes of the link's layers (the
excluded head stays float). Two hand-written steps make the result compute what the PyTorch link computes:

* **Pinned ranges.** Every quantised input and output tensor gets ``TensorQuantOverrides`` ``rmin``/``rmax`` = the
  link's recorded range; ORT then derives scales and zero points with its own formulas (weights: from the weights),
  which :mod:`dgkit.compress.int8_layer` mirrors, so both sit on one grid (and ``percentile`` ranges carry over).
  ORT's own MinMax ranges are compared to the recorded ones (``minmax``: equal within 1e-3 of the range;
  ``percentile``: inside it): a check that each layer found its node and that the images are the link's.
* **Private inputs.** ORT quantises a tensor for *all* its readers, the link quantises a layer's input for that
  layer only. Where a quantised layer's input is also read by a float node (ResNet's shortcut), the layer reads it
  through an ``Identity``; ORT's optimiser removes the Identity at load and keeps the Q/DQ on the layer's path.
  ``share_inputs=True`` keeps ORT's default instead: faster where the shortcut then runs in uint8 (ResNet-18,
  1 thread: 13.9 vs 16.1 ms), further from the reference (logits rel. L2 0.028 vs 0.013; quantisation error 0.064).

Writing the Q/DQ nodes ourselves would be possible, but ORT's quantiser then stays the authority on bias, weight
and node handling, and a change there shows up as a failed grid check instead of silent drift. Layers are found
by their weight initialiser (``<layer>.weight``) or the exporter's name scope; a method's ``classifier`` is the
inference model's ``head``. ``quant_pre_process`` is not run: on ResNet-18 and the small CNN it changed neither the
quantised nodes nor the latency (ORT applies the same optimisations when the session loads).
"""

from __future__ import annotations

import ast
import difflib
import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.calibrate import load_tensors_data

log = logging.getLogger(__name__)

OP_TYPES = ("Conv", "MatMul", "Gemm")
RANGE_TOLERANCE = 1e-3  # ORT's MinMax range vs the link's, relative to the range's width
_NAME_SCOPES = "pkg.torch.onnx.name_scopes"
_PRIVATE_SUFFIX = "_int8_input"
_ALIASES = (("classifier", "head"), ("head", "classifier"))  # a method's head is the inference model's head


class ImageReader(CalibrationDataReader):
    """ORT calibration batches from an image tensor ``(N, C, H, W)``."""

    def __init__(self, input_name: str, images: torch.Tensor, batch_size: int = 16) -> None:
        self.input_name = input_name
        self.batches = [b.detach().cpu().float().numpy() for b in images.split(batch_size)]
        self._it: Iterator[np.ndarray] = iter(self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next batch as ``{input name: array}``; ``None`` at the end."""
        batch = next(self._it, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        """Start over."""
        self._it = iter(self.batches)


def _module_paths(node: onnx.NodeProto, initializers: set[str]) -> set[str]:
    """The module names ``node`` may belong to: its weight initialiser's owner and the exporter's name scope."""
    paths = set()
    if len(node.input) > 1 and node.input[1] in initializers and node.input[1].endswith(".weight"):
        paths.add(node.input[1].removesuffix(".weight"))
    for prop in node.metadata_props:
        if prop.key == _NAME_SCOPES:
            scopes = ast.literal_eval(prop.value)  # ['', 'backbone', 'backbone.features.0', 'conv2d']
            if len(scopes) >= 3:
                paths.add(scopes[-2])
    return paths


def _candidates(layer: str) -> list[str]:
    names = [layer]
    for old, new in _ALIASES:
        if layer == old or layer.startswith(old + "."):
            names.append(new + layer[len(old) :])
    return names


def layer_nodes(model: onnx.ModelProto, layers: Sequence[str]) -> dict[str, list[str]]:
    """``{layer: [names of the Conv/MatMul/Gemm nodes computing it]}`` (a layer called twice has two nodes).

    Raises:
        ValueError: a layer with no node in the graph (naming the module names the graph has), or unnamed nodes.
    """
    names = [n.name for n in model.graph.node]
    if not all(names) or len(set(names)) != len(names):
        raise ValueError("int8 export: the graph's nodes need unique names (ORT selects nodes by name)")
    initializers = {t.name for t in model.graph.initializer}
    owners = [(node, _module_paths(node, initializers)) for node in model.graph.node if node.op_type in OP_TYPES]
    found = {}
    for layer in layers:
        candidates = set(_candidates(layer))
        found[layer] = [node.name for node, paths in owners if paths & candidates]
        if not found[layer]:
            known = sorted(set().union(*(paths for _, paths in owners)))
            close = difflib.get_close_matches(layer, known, n=5, cutoff=0.3)
            raise ValueError(
                f"int8 layer {layer!r} has no {'/'.join(OP_TYPES)} node in the graph; close module names: {close}"
            )
    return found


def private_inputs(model: onnx.ModelProto, chosen: set[str]) -> None:
    """Give each node of ``chosen`` (names) an ``Identity`` copy of its input where a node outside ``chosen`` (or
    the graph output) reads that input too and no chosen node produces it (see the module docstring)."""
    graph = model.graph
    nodes = list(graph.node)
    produced = {out for n in nodes if n.name in chosen for out in n.output}
    outputs = {o.name for o in graph.output}
    inserts: dict[str, onnx.NodeProto] = {}  # first chosen reader -> the Identity to put before it
    for tensor in dict.fromkeys(n.input[0] for n in nodes if n.name in chosen):
        readers = [n for n in nodes if tensor in n.input]
        if tensor in produced or (tensor not in outputs and all(n.name in chosen for n in readers)):
            continue
        private = tensor + _PRIVATE_SUFFIX
        mine = [n for n in readers if n.name in chosen and n.input[0] == tensor]
        for n in mine:
            n.input[0] = private
        inserts[mine[0].name] = helper.make_node("Identity", [tensor], [private], name=private)
    ordered = [m for n in nodes for m in ([inserts[n.name]] if n.name in inserts else []) + [n]]
    del graph.node[:]
    graph.node.extend(ordered)


def range_overrides(
    model: onnx.ModelProto, nodes: dict[str, list[str]], ranges: dict[str, Any]
) -> dict[str, list[dict]]:
    """``TensorQuantOverrides`` pinning each quantised input and output tensor to the link's recorded range (a
    tensor two layers share takes the union, normally equal)."""
    by_name = {n.name: n for n in model.graph.node}
    pinned: dict[str, tuple[float, float]] = {}
    for layer, names in nodes.items():
        for node in (by_name[n] for n in names):
            for tensor, side in ((node.input[0], "input"), (node.output[0], "output")):
                low, high = ranges[layer][side]
                old = pinned.get(tensor, (low, high))
                pinned[tensor] = (min(low, old[0]), max(high, old[1]))
    return {t: [{"rmin": np.array(lo, np.float32), "rmax": np.array(hi, np.float32)}] for t, (lo, hi) in pinned.items()}


def check_ranges(calibrated: dict[str, tuple[float, float]], overrides: dict[str, list[dict]], method: str) -> float:
    """The largest gap between ORT's MinMax ranges and the pinned ones, relative to the span of each grid.

    Raises:
        ValueError: ``minmax`` ranges that differ by more than :data:`RANGE_TOLERANCE`, or ``percentile`` ranges
            outside ORT's: a layer matched to the wrong node, or calibration images that are not the link's.
    """
    worst = 0.0
    for tensor, (override,) in overrides.items():
        lo, hi = float(override["rmin"]), float(override["rmax"])
        ort_lo, ort_hi = calibrated[tensor]
        width = max(max(hi, ort_hi, 0.0) - min(lo, ort_lo, 0.0), 1e-12)  # the grid's span: it always holds 0
        if method == "minmax":
            gap = max(abs(lo - ort_lo), abs(hi - ort_hi)) / width
        else:  # a percentile range lies inside the full one
            gap = max(ort_lo - lo, hi - ort_hi, 0.0) / width
        worst = max(worst, gap)
        if gap > RANGE_TOLERANCE:
            raise ValueError(
                f"int8 export: tensor {tensor!r} was calibrated to [{lo:.6g}, {hi:.6g}] by the link but ORT sees "
                f"[{ort_lo:.6g}, {ort_hi:.6g}] on the images given: pass the link's calibration images"
            )
    return worst


def _state(record: dict[str, Any]) -> dict[str, Any]:
    """The link's state from its chain record (``{"config", "stage", "state"}``) or the state itself."""
    return record["state"] if "state" in record else record


def quantize_qdq(float_onnx: Path, out: Path, calibration_images: torch.Tensor, record: dict[str, Any], *,
                 share_inputs: bool = False) -> None:  # fmt: skip
    """Write the static int8 QDQ model of ``float_onnx`` to ``out`` (see the module docstring).

    Args:
        float_onnx: the exported float graph (one file, input ``input``), ``Int8Layer``s as their float layers.
        out: where the QDQ model goes (one file).
        calibration_images: the link's calibration images ``(N, C, H, W)`` (normalised, source domains).
        record: the link's chain record (or its state): ``layers``, ``ranges``, ``method``.
        share_inputs: ORT's default placement (a quantised input is quantised for every reader) instead of the
            link's (for the layer only).

    Raises:
        ValueError: a layer without a node, or ranges that disagree with ORT's on these images.
    """
    state = _state(record)
    model = onnx.load(str(float_onnx))
    nodes = layer_nodes(model, state["layers"])
    chosen = [n for names in nodes.values() for n in names]
    if not share_inputs:
        private_inputs(model, set(chosen))
    overrides = range_overrides(model, nodes, state["ranges"]) if state.get("ranges") else {}
    reader = ImageReader(model.graph.input[0].name, calibration_images)
    with tempfile.TemporaryDirectory(prefix="dgkit-qdq-") as tmp, _quiet_preprocess_warning():
        cache, result = Path(tmp) / "ranges.json", Path(tmp) / "model.onnx"
        quantize_static(
            model, result, reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(OP_TYPES),
            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            nodes_to_quantize=chosen, calibrate_method=CalibrationMethod.MinMax,
            calibration_cache_path=cache, extra_options={"TensorQuantOverrides": overrides},
        )  # fmt: skip
        if overrides:
            data = load_tensors_data(cache).data
            calibrated = {t: tuple(float(np.asarray(v).reshape(-1)[0]) for v in data[t].range_value) for t in overrides}
            worst = check_ranges(calibrated, overrides, state.get("method", "minmax"))
            log.info("int8 QDQ: %d layers, ranges pinned (ORT's own within %.2g of them)", len(nodes), worst)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(result, out)


class _NoPreprocessAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-process" not in record.getMessage()


class _quiet_preprocess_warning:  # noqa: N801 (a context manager used like a function)
    """Drop ORT's "please run pre-processing" warnings (measured: no effect here; see the module docstring)."""

    def __enter__(self) -> None:
        self.filter = _NoPreprocessAdvice()
        logging.getLogger().addFilter(self.filter)

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().removeFilter(self.filter)
