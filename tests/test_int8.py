"""Int8 static quantisation: ORT's formulas in PyTorch, the fake-quant layer, source-only calibration, BatchNorm
folding and data-free replay (the ORT QDQ model against the PyTorch reference: ``tests/test_int8_qdq.py``)."""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from dgkit.chain import TransformContext, replay_chain
from dgkit.compose import build
from dgkit.compress.base import set_submodule
from dgkit.compress.calibration import calibration_data
from dgkit.compress.int8 import Int8Quantize, fold_batchnorms
from dgkit.compress.int8_layer import (
    Int8Layer,
    RangeObserver,
    activation_params,
    fake_quantize,
    quantize_weight,
    weight_scales,
)

CONFIG = Path(__file__).resolve().parents[1] / "conf" / "compress" / "int8.yaml"


# ---- the formulas against float64 references ------------------------------------------------------------------
def test_weight_quantiser_matches_a_float64_reference():
    w = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    w[2] = 0  # an all-zero channel: ORT's scale is 1
    w[3] *= 1e-3
    scales, codes = weight_scales(w), quantize_weight(w, weight_scales(w))
    w64 = w.double().numpy().reshape(6, -1)
    ref_scales = np.array([np.abs(r).max() / 127 if np.abs(r).max() > 0 else 1.0 for r in w64])
    np.testing.assert_array_equal(scales.numpy(), ref_scales.astype(np.float32))
    ratio = w64 / scales.double().numpy()[:, None]
    ref_codes = np.clip(np.round(ratio), -127, 127)
    tie = np.abs(np.abs(ratio - np.trunc(ratio)) - 0.5) < 1e-4  # float32 vs float64 division may round a tie apart
    assert np.array_equal(codes.numpy().reshape(6, -1)[~tie], ref_codes[~tie])
    assert codes.abs().amax((1, 2, 3)).tolist() == [127, 127, 0, 127, 127, 127]


@pytest.mark.parametrize("low,high", [(-1.3, 2.7), (0.2, 5.0), (-4.0, -0.5), (0.0, 0.0)])
def test_activation_quantiser_matches_a_float64_reference(low, high):
    x = torch.linspace(low - 1, high + 1, 997)  # also outside the range: clamped
    scale, zero = activation_params(low, high)
    lo, hi = min(low, 0.0), max(high, 0.0)
    ref_scale = (hi - lo) / 255 if hi > lo else 1.0
    ref_zero = round(-lo / ref_scale)
    assert float(scale) == pytest.approx(ref_scale, rel=1e-7) and int(zero) == ref_zero
    ref = (np.clip(np.round(x.double().numpy() / ref_scale) + ref_zero, 0, 255) - ref_zero) * ref_scale
    np.testing.assert_allclose(fake_quantize(x, scale, zero).double().numpy(), ref, atol=2e-6 * ref_scale + 1e-7)
    assert zero.dtype == torch.uint8


def test_percentile_range_cuts_both_tails():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    observer = RangeObserver()
    observer.update(x)
    observer.start_histogram()
    observer.update(x)
    lo, hi = observer.percentile_range(99.0)
    ref_lo, ref_hi = np.quantile(x.numpy(), [0.005, 0.995])
    width = (float(x.max()) - float(x.min())) / 2048
    assert abs(lo - ref_lo) <= 2 * width and abs(hi - ref_hi) <= 2 * width
    assert float(x.min()) < lo < hi < float(x.max())


# ---- the fake-quant layer by hand ------------------------------------------------------------------------------
def _grid(low: float, high: float) -> tuple[float, int]:
    scale = (max(high, 0.0) - min(low, 0.0)) / 255
    return scale, round(-min(low, 0.0) / scale)


def _code(value: float, scale: float) -> int:
    """``round(value / scale)`` half to even, the division in float32 (ONNX QuantizeLinear)."""
    return int(np.round(np.float32(value) / np.float32(scale)))


def _hand_layer(x: list, w: list, b: list, ranges, windows, bias_inside: bool) -> np.ndarray:
    """Integer arithmetic as QLinearConv/QGemm do it: uint8 input codes, int8 weight codes, int32 bias codes."""
    (s_in, z_in), (s_out, z_out) = _grid(*ranges[0]), _grid(*ranges[1])
    s_in, s_out = float(np.float32(s_in)), float(np.float32(s_out))
    results = []
    for positions in windows:  # one output position: a list of (input index, weight index) per channel
        row = []
        for c in range(len(w)):
            s_w = float(np.float32(np.abs(w[c]).max() / 127))
            s_b = float(np.float32(s_in) * np.float32(s_w))
            acc = sum((min(max(_code(x[i], s_in) + z_in, 0), 255) - z_in) * _code(w[c][j], s_w) for i, j in positions)
            y = acc * s_b + (round(b[c] / s_b) * s_b if bias_inside else 0.0)
            q = min(max(round(y / s_out) + z_out, 0), 255)
            row.append((q - z_out) * s_out + (0.0 if bias_inside else b[c]))
        results.append(row)
    return np.array(results)


def _frozen(layer: nn.Module, ranges, rank: int) -> Int8Layer:
    wrapped = Int8Layer(layer)
    wrapped.input_rank = rank
    wrapped.freeze(*ranges)
    return wrapped


def test_fake_quant_conv_equals_a_hand_computation():
    conv = nn.Conv2d(1, 2, 2)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[0.5, -0.25], [0.1, 0.3]]], [[[-1.0, 0.2], [0.05, 0.0]]]]))
        conv.bias.copy_(torch.tensor([0.1, -0.3]))
    x = torch.tensor([[[[0.31, -0.72, 1.93], [1.13, 0.05, -0.41], [0.62, 1.37, -0.98]]]])
    ranges = ((-1.0, 2.0), (-1.5, 1.0))
    y = _frozen(conv, ranges, 4)(x)  # (1, 2, 2, 2)
    flat, w = x.flatten().tolist(), conv.weight.detach().reshape(2, 4).tolist()
    windows = [
        [(3 * (r + i) + (c + j), 2 * i + j) for i in range(2) for j in range(2)] for r in range(2) for c in range(2)
    ]
    expected = _hand_layer(flat, w, conv.bias.detach().tolist(), ranges, windows, bias_inside=True)  # (4 positions, 2)
    np.testing.assert_allclose(y[0].detach().permute(1, 2, 0).reshape(4, 2).numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("tokens", [False, True])
def test_fake_quant_linear_quantises_its_output_where_ort_does(tokens):
    """A 2-D input exports as Gemm (int32 bias inside the quantised output); tokens as MatMul + a float Add."""
    linear = nn.Linear(3, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[0.4, -0.9, 0.25], [0.7, 0.1, -0.2]]))
        linear.bias.copy_(torch.tensor([0.33, -0.05]))
    x = torch.tensor([[0.5, -1.2, 2.0], [1.5, 0.3, -0.8]])
    ranges = ((-1.5, 2.5), (-2.0, 1.5))
    layer = _frozen(linear, ranges, 3 if tokens else 2)
    y = layer(x[None])[0] if tokens else layer(x)
    windows = [[(3 * r + k, k) for k in range(3)] for r in range(2)]
    w, b = linear.weight.detach().tolist(), linear.bias.detach().tolist()
    expected = _hand_layer(x.flatten().tolist(), w, b, ranges, windows, bias_inside=not tokens)
    np.testing.assert_allclose(y.detach().numpy(), expected, atol=1e-6)


# ---- calibration, folding and replay ---------------------------------------------------------------------------
class Forbidden(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int):
        raise AssertionError("a held-out image was read")


@pytest.fixture
def synthetic(tiny_cfg, one_thread):
    """``(cfg, datamodule, method)``: :func:`synthetic_setup`."""
    return synthetic_setup(tiny_cfg)


def synthetic_setup(tiny_cfg):
    """``(cfg, datamodule, method)``: small_cnn_lite on the synthetic 16 px benchmark, held-out images unreadable."""
    cfg = tiny_cfg("backbone=small_cnn_lite")
    torch.manual_seed(0)
    datamodule, method = build(cfg)
    datamodule.benchmark.datasets[datamodule.test_domains[0]] = Forbidden()
    return cfg, datamodule, method.eval()


def _context(datamodule) -> TransformContext:
    return TransformContext(stage="after_fit", datamodule=datamodule)


def _extremes(model: nn.Module, names: list[str], images: torch.Tensor) -> dict[str, dict[str, list[float]]]:
    """Min and max of each named layer's input and output over ``images``, by plain forward hooks."""
    seen: dict[str, dict[str, list[float]]] = {}

    def hook(name):
        def record(_m, inputs, output):
            for side, t in (("input", inputs[0]), ("output", output)):
                lo, hi = seen.setdefault(name, {}).get(side, [math.inf, -math.inf])
                seen[name][side] = [min(lo, float(t.min())), max(hi, float(t.max()))]

        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    with torch.no_grad():
        model(images)
    for h in handles:
        h.remove()
    return seen


def test_calibration_ranges_are_min_max_over_the_source_images_only(synthetic):
    _, datamodule, method = synthetic
    float_model = copy.deepcopy(method)
    state = Int8Quantize(calibration={"images_per_domain": 8}).transform(method, _context(datamodule))
    assert state["calibration"]["domains"] == datamodule.source_domains
    assert state["layers"] == [f"backbone.features.{i}" for i in (0, 3, 6, 9)]  # the head stays float
    assert isinstance(method.classifier, nn.Linear) and not state["folded"]  # GroupNorm: nothing to fold
    images = torch.cat(list(calibration_data(datamodule, 8).images.values()))
    expected = _extremes(float_model, state["layers"], images)
    for name in state["layers"]:
        layer = method.get_submodule(name)
        for side in ("input", "output"):
            np.testing.assert_allclose(state["ranges"][name][side], expected[name][side], rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(getattr(layer, f"{side}_range").tolist(), expected[name][side], rtol=1e-6)
    with pytest.raises(AssertionError, match="held-out image"):
        Int8Quantize(calibration={"images_per_domain": 8, "allow_target": True}).transform(
            copy.deepcopy(float_model), _context(datamodule)
        )


def test_replay_through_the_chain_reproduces_the_outputs_exactly(synthetic, tiny_cfg):
    cfg, datamodule, method = synthetic
    config = OmegaConf.to_container(OmegaConf.load(CONFIG))
    config["calibration"]["images_per_domain"] = 4
    link = Int8Quantize(**{k: v for k, v in config.items() if k != "_target_"})
    state = link.transform(method, _context(datamodule))
    record = {"config": config, "stage": "after_fit", "state": state}
    buffer = io.BytesIO()
    torch.save(record, buffer)  # checkpoint metadata is read with weights_only=True
    record = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    torch.manual_seed(1)
    _, fresh = build(cfg)
    replay_chain([record], fresh, "after_fit")
    fresh.load_state_dict(method.state_dict())
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), method(x))
    assert float(fresh.backbone.features[0].input_scale) != 1.0  # the checkpoint filled the placeholders


class Block(nn.Module):
    """A ResNet basic block: two conv-BN pairs and an identity shortcut."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class Tokens(nn.Module):
    """Conv-BN, a residual block, conv-ReLU(inplace)-BN (not foldable), a linear on tokens, a linear on vectors."""

    def __init__(self) -> None:
        super().__init__()
        stem = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), Block(8)]
        self.features = nn.Sequential(*stem, nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(inplace=True), nn.BatchNorm2d(16))
        self.proj, self.fc = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.features(x).flatten(2).transpose(1, 2)  # (B, N, 16): exports as MatMul + Add
        return self.fc(self.proj(tokens).mean(1))  # (B, 16): Gemm


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone, self.classifier = Tokens(), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x))


def _toy(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    toy = Toy()
    with torch.no_grad():
        for m in toy.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.3, 0.3)
        toy.backbone.features[0].weight[0] *= 1e-8  # its int32 bias forces ORT to raise the weight scale
    return toy.eval()


def _float_copy(model: nn.Module) -> nn.Module:
    """The graph an exporter sees: every Int8Layer as its float layer."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, Int8Layer):
            set_submodule(model, name, module.float_module())
    return model.eval()


def test_batchnorm_folding_and_data_free_replay(synthetic):
    _, datamodule, _ = synthetic
    toy, original = _toy(), _toy()
    state = Int8Quantize(calibration={"images_per_domain": 8}).transform(toy, _context(datamodule))
    assert state["folded"] == {
        "backbone.features.0": "backbone.features.1",
        "backbone.features.3.conv1": "backbone.features.3.bn1",
        "backbone.features.3.conv2": "backbone.features.3.bn2",
    }  # features.4 -> ReLU(inplace) -> BN: the BN reads a modified tensor, not folded
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(_float_copy(toy)(x), original(x), atol=1e-5, rtol=1e-5)
        fresh = _toy(seed=1)
        Int8Quantize().replay(fresh, state)
        fresh.load_state_dict(toy.state_dict())
        assert torch.equal(fresh(x), toy(x))


def test_a_convolution_read_beyond_its_batchnorm_is_not_silently_folded():
    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y

    model = Both().eval()
    model.bn.running_var.fill_(4.0)
    with pytest.raises(RuntimeError, match="read by more than its BatchNorm"):
        fold_batchnorms(model, ["conv"], torch.randn(2, 3, 4, 4))
