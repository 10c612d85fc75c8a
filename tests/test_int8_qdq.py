"""Int8 static quantisation in ONNX Runtime: the QDQ model written by ``dgkit.export.qdq`` against the PyTorch
fake-quant reference (split from ``tests/test_int8.py``, whose toy models and fixtures it reuses)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from dgkit.compress.calibration import calibration_data
from dgkit.compress.int8 import Int8Quantize
from dgkit.compress.int8_layer import weight_scales
from dgkit.export.qdq import layer_nodes, quantize_qdq
from tests.test_int8 import _context, _float_copy, _toy, synthetic_setup


@pytest.fixture
def synthetic(tiny_cfg, one_thread):
    """``(cfg, datamodule, method)``: small_cnn_lite on synthetic data, held-out images unreadable."""
    return synthetic_setup(tiny_cfg)


# ---- the ORT QDQ model against the PyTorch reference -----------------------------------------------------------
def _export(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path), dynamo=True, external_data=False, verbose=False, input_names=["input"],
            output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        )  # fmt: skip
    return path


def _session(path: Path, optimized: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _qdq_params(model: onnx.ModelProto, node_name: str) -> dict[str, np.ndarray]:
    """The scales and zero points ORT gave one quantised node: its input's, its weight's and its output's."""
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {out: n for n in model.graph.node for out in n.output}
    node = next(n for n in model.graph.node if n.name == node_name)
    dq_in, dq_w = producer[node.input[0]], producer[node.input[1]]
    q_out = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == node.output[0])
    assert dq_in.op_type == dq_w.op_type == "DequantizeLinear"
    return {
        "input_scale": constants[dq_in.input[1]], "input_zero_point": constants[dq_in.input[2]],
        "weight_scale": constants[dq_w.input[1]],
        "output_scale": constants[q_out.input[1]], "output_zero_point": constants[q_out.input[2]],
    }  # fmt: skip


def _agreement(session: ort.InferenceSession, reference: nn.Module, images: torch.Tensor) -> tuple[float, float]:
    """Top-1 agreement of the ORT model and the PyTorch fake-quant reference, and their max |logit difference|
    relative to the largest logit (float summation order can flip a value sitting on a rounding boundary by one
    step of its grid: a few such flips per image are expected, a wrong grid is far off)."""
    with torch.no_grad():
        expected = reference(images).numpy()
    got = session.run(None, {"input": images.numpy()})[0]
    top1 = float((got.argmax(1) == expected.argmax(1)).mean())
    return top1, float(np.abs(got - expected).max() / np.abs(expected).max())


def test_ort_qdq_model_sits_on_the_links_grid_and_agrees_with_it(synthetic, tmp_path):
    _, datamodule, _ = synthetic
    toy = _toy()
    record = {"stage": "after_fit", "state": Int8Quantize(calibration={"images_per_domain": 8}).transform(
        toy, _context(datamodule))}  # fmt: skip
    layers = record["state"]["layers"]
    assert float(toy.backbone.features[0].weight_scale[0]) > float(
        weight_scales(toy.backbone.features[0].layer.weight)[0]
    )
    calibration = torch.cat(list(calibration_data(datamodule, 8).images.values()))
    float_path = _export(_float_copy(toy), calibration[:2], tmp_path / "float.onnx")
    quantize_qdq(float_path, tmp_path / "int8.onnx", calibration, record)

    qdq = onnx.load(str(tmp_path / "int8.onnx"))
    nodes = layer_nodes(onnx.load(str(float_path)), layers)
    for name in layers:  # ORT derived every scale itself from the pinned ranges and the weights: the same grid
        params, layer = _qdq_params(qdq, nodes[name][0]), toy.get_submodule(name)
        for key, value in params.items():
            np.testing.assert_array_equal(value, getattr(layer, key).numpy(), err_msg=f"{name} {key}")
    ops = {n.op_type for n in qdq.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Identity"} <= ops  # Identity: the shortcut's private copy
    shortcut = next(n for n in qdq.graph.node if n.op_type == "Add" and "DequantizeLinear" not in n.input[0])
    assert shortcut.input[0].startswith("relu")  # the block input reaches the Add in float, as in PyTorch

    session = _session(tmp_path / "int8.onnx", tmp_path / "optimized.onnx")
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    kernels = [n.op_type for n in optimized.graph.node]
    assert {"QLinearConv", "QLinearMatMul", "QGemm"} <= set(kernels)
    head = [n for n in optimized.graph.node if "classifier.weight" in n.input]
    assert [n.op_type for n in head] == ["Gemm"]  # the head stays float
    images = torch.cat([datamodule.split(d, "out")[i][0][None] for d in datamodule.source_domains for i in range(12)])
    top1, max_diff = _agreement(session, toy, torch.cat([images, calibration]))
    print(f"toy CNN: ORT int8 vs fake-quant top-1 {top1:.3f}, max |diff| / max |logit| {max_diff:.3g}")
    assert top1 >= 0.99 and max_diff < 0.02
    with pytest.raises(ValueError, match="no Conv/MatMul/Gemm node"):
        layer_nodes(qdq, ["backbone.nowhere"])
    quantize_qdq(float_path, tmp_path / "shared.onnx", calibration, record, share_inputs=True)  # ORT's default
    shared = onnx.load(str(tmp_path / "shared.onnx"))
    add = next(n for n in shared.graph.node if n.op_type == "Add" and n.input[0].startswith("relu"))
    assert add.input[0].endswith("DequantizeLinear_Output") and "Identity" not in {n.op_type for n in shared.graph.node}


def test_a_dgkit_model_exports_with_percentile_ranges_and_a_float_head(synthetic, tmp_path):
    """The exporter's path: method -> link -> to_inference() (the head is ``head`` there) -> float graph -> QDQ."""
    _, datamodule, method = synthetic
    link = Int8Quantize(calibration={"images_per_domain": 8}, method="percentile", percentile=99.9)
    record = {"stage": "after_fit", "state": link.transform(method, _context(datamodule))}
    inference = method.to_inference()
    calibration = torch.cat(list(calibration_data(datamodule, 8).images.values()))
    float_path = _export(_float_copy(inference), calibration[:2], tmp_path / "float.onnx")
    quantize_qdq(float_path, tmp_path / "int8.onnx", calibration, record)
    qdq = onnx.load(str(tmp_path / "int8.onnx"))
    quantised = {
        n.input[1] for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.input[1].endswith("weight_scale")
    }
    assert quantised == {f"backbone.features.{i}.weight_scale" for i in (0, 3, 6, 9)}
    head = next(n for n in qdq.graph.node if "head.weight" in n.input)
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == head.output[0] for n in qdq.graph.node)
    top1, max_diff = _agreement(_session(tmp_path / "int8.onnx"), inference, calibration)
    print(
        f"small_cnn_lite (percentile): ORT int8 vs fake-quant top-1 {top1:.3f}, max |diff| / max |logit| {max_diff:.3g}"
    )
    assert top1 >= 0.99 and max_diff < 0.02
