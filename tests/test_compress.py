"""Weight quantisation (RTN, AWQ), source-only calibration, and the compress step's variant folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from dgkit.chain import TransformContext, replay_chain
from dgkit.checkpoint import load_checkpoint
from dgkit.compose import build
from dgkit.compress.awq import ScaledActivation, WeightQuantize, search_scale
from dgkit.compress.base import select_layers
from dgkit.compress.calibration import calibration_data, combine_domains
from dgkit.compress.quantizer import QuantLinear, dequantize_groups, group_size_for, quantize_groups
from dgkit.compress.runner import compress_checkpoint
from dgkit.eval.records import load_runs
from dgkit.run import train


def reference_quantize(w: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Group-wise asymmetric min-max quantisation in float64, loop by loop (the formula, independently)."""
    out = np.empty_like(w, dtype=np.float64)
    qmax = 2**bits - 1
    for r in range(w.shape[0]):
        for g in range(0, w.shape[1], group):
            block = w[r, g : g + group].astype(np.float64)
            scale = max(block.max() - block.min(), 1e-5) / qmax
            zero = min(max(-np.round(block.min() / scale), 0), qmax)
            q = np.clip(np.round(block / scale) + zero, 0, qmax)
            out[r, g : g + group] = (q - zero) * scale
    return out


@pytest.mark.parametrize("bits,group", [(4, 32), (8, 16), (3, 64)])
def test_group_quantiser_matches_a_float64_reference(bits, group):
    w = torch.randn(7, 128, generator=torch.Generator().manual_seed(bits))
    codes, scales, zeros = quantize_groups(w, bits, group)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    np.testing.assert_allclose(dequantize_groups(codes, scales, zeros).numpy(),
                               reference_quantize(w.numpy(), bits, group), atol=1e-6)  # fmt: skip


def test_group_size_falls_back_and_says_so(caplog):
    with caplog.at_level("INFO"):
        assert group_size_for(96, 128, "blocks.0.attn.qkv") == 32
    assert "does not divide 96" in caplog.text
    assert group_size_for(384, 128) == 128
    with pytest.raises(ValueError, match="no group size"):
        group_size_for(100, 128)


def test_quant_linear_computes_with_its_dequantised_weight():
    linear = nn.Linear(64, 5)
    q = QuantLinear.from_linear(linear, 4, 32)
    x = torch.randn(3, 64)
    expected = x.double() @ torch.from_numpy(reference_quantize(linear.weight.detach().numpy(), 4, 32)).T
    torch.testing.assert_close(q(x).double(), expected + linear.bias.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q.float_module()(x), q(x))


def _block(seed: int = 0) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    vit = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32)
    return vit.blocks[0].eval()


@pytest.mark.parametrize("group", ["norm1", "attn.qkv", "norm2", "mlp.act"])
def test_awq_folding_leaves_the_float_function_unchanged(group):
    """Scale then inverse scale: the block computes the same before any rounding (all four AWQ groups)."""
    block = _block()
    x = torch.randn(2, 17, block.norm1.normalized_shape[0])
    before = block(x)
    balanced = {"norm1": "attn.qkv", "attn.qkv": "attn.proj", "norm2": "mlp.fc1", "mlp.act": "mlp.fc2"}[group]
    linear = block.get_submodule(balanced)
    s = torch.rand(linear.in_features, generator=torch.Generator().manual_seed(1)) * 3 + 0.2
    state = {"scaled_activations": {}}
    WeightQuantize._fold(block, group, linear, s, "blocks.0", state)
    torch.testing.assert_close(block(x), before, atol=1e-5, rtol=1e-4)
    assert isinstance(block.mlp.act, ScaledActivation) == (group == "mlp.act")


def test_awq_scale_search_picks_no_scaling_for_uniform_activations():
    """All channels equally active: s_X is constant, every alpha gives s = 1, so alpha = 0 (plain RTN) wins."""
    linear = nn.Linear(64, 32, bias=False)
    x = torch.ones(256, 64)
    s, alpha, error, rtn_error = search_scale(x, [linear], linear, 4, [32])
    assert alpha == 0.0 and error == rtn_error
    torch.testing.assert_close(s, torch.ones(64))


def test_awq_protects_a_salient_channel():
    """A planted channel 50x more active than the rest: AWQ scales it up, and its output error beats RTN's."""
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 32, bias=False)
    x = torch.randn(512, 64, generator=g) * 0.1
    x[:, 5] *= 50
    s, alpha, error, rtn_error = search_scale(x, [linear], linear, 3, [64])
    assert alpha > 0 and error < 0.8 * rtn_error
    assert int(s.argmax()) == 5


def test_calibration_never_reads_a_held_out_image(tiny_cfg):
    datamodule, _ = build(tiny_cfg())
    held_out = datamodule.test_domains[0]

    class Forbidden(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            raise AssertionError("a held-out image was read")

    datamodule.benchmark.datasets[held_out] = Forbidden()
    calibration = calibration_data(datamodule, images_per_domain=4)
    assert held_out not in calibration.domains and calibration.domains == datamodule.source_domains
    with pytest.raises(AssertionError, match="held-out image"):
        calibration_data(datamodule, images_per_domain=4, allow_target=True)


def test_domain_combinations():
    scores = {"a": torch.tensor([1.0, 1.0, 10.0, 0.1]), "b": torch.tensor([1.0, 1.0, 0.1, 0.1])}
    kept_by_min = combine_domains(scores, "min")  # its best normalised score: domain a's 10 survives
    assert kept_by_min.argsort()[:1].tolist() == [3]
    torch.testing.assert_close(combine_domains(scores, "weighted", {"a": 1, "b": 0}), scores["a"] / 3.025)
    with pytest.raises(ValueError, match="choose one of"):
        combine_domains(scores, "median")


def test_unknown_layer_names_list_close_matches(tiny_cfg):
    _, method = build(tiny_cfg())
    with pytest.raises(ValueError, match=r"'atn\.qkv' matches no layer.*attn"):
        select_layers(method, (nn.Linear,), exclude=["atn.qkv"])
    names = select_layers(method, (nn.Linear,))
    assert names and not any("classifier" in n or "patch_embed" in n for n in names)


@pytest.fixture
def trained_vit(tiny_cfg, one_thread):
    cfg = tiny_cfg("trainer.max_steps=6", "trainer.val_check_interval=3")
    train(cfg)
    return cfg


def test_awq_checkpoint_reloads_through_the_chain_and_makes_a_table_row(trained_vit, tmp_path):
    run = tmp_path / "run"
    config = {"_target_": "dgkit.compress.awq.WeightQuantize", "name": "awq_w4", "bits": 4, "group": 32,
              "calibration": {"images_per_domain": 8}}  # fmt: skip
    result = compress_checkpoint(run / "checkpoints" / "best.ckpt", config, "awq_w4")
    folder = run / "variants" / "awq_w4"
    assert result["folder"] == str(folder) and (folder / "done").exists()
    report = json.loads((folder / "final.json").read_text())["compress"]
    assert report["calibration"]["domains"] == json.loads((run / "run.json").read_text())["domains"][:2]
    errors = report["report"]["logits_error"]
    assert errors["awq"] <= errors["rtn"] * 1.05  # AWQ's scales were chosen to beat RTN on these images
    _, method = load_checkpoint(result["checkpoint"])
    quantised = [m for m in method.modules() if isinstance(m, QuantLinear)]
    assert quantised and all(q.bits == 4 for q in quantised)
    assert any(isinstance(m, ScaledActivation) for m in method.modules())
    rows = {r.tag for r in load_runs(run)}
    assert rows == {"ERM", "ERM+AWQ-W4"}
    assert (
        json.loads((folder / "results.jsonl").read_text())["step"]
        == json.loads((run / "final.json").read_text())["step"]
    )


def test_replay_rebuilds_the_quantised_structure_without_data(trained_vit, tmp_path):
    from dgkit.checkpoint import read_checkpoint

    cfg, method = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.ckpt")
    _, fresh = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.ckpt")
    config = {"_target_": "dgkit.compress.awq.WeightQuantize", "algorithm": "rtn", "bits": 8}
    link = WeightQuantize(algorithm="rtn", bits=8)
    state = link.transform(method, TransformContext(stage="after_fit"))  # RTN needs no data
    replay_chain([{"config": config, "stage": "after_fit", "state": state}], fresh, "after_fit")
    fresh.load_state_dict(method.state_dict())
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(fresh(x), method(x))
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "best.ckpt")  # untouched


def test_compressing_a_simclr_checkpoint_says_what_to_do(tiny_cfg, one_thread, tmp_path):
    train(tiny_cfg("method=simclr", "trainer.max_steps=2", "trainer.val_check_interval=2"))
    with pytest.raises(ValueError, match="linear probe"):
        compress_checkpoint(tmp_path / "run" / "checkpoints" / "best.ckpt", {"_target_":
                            "dgkit.compress.awq.WeightQuantize", "algorithm": "rtn"}, "rtn_w4")  # fmt: skip


def test_an_export_folder_is_evaluated_as_a_row_of_the_run(trained_vit, tmp_path):
    """Compress (RTN W4), export to ONNX Runtime (MatMulNBits), evaluate the artifact on every domain: it lands
    in the run's table as its own row, and its scores equal the PyTorch fake-quant model's."""
    from dgkit.export.evaluate import evaluate_export
    from dgkit.export.folder import export_checkpoint

    run = tmp_path / "run"
    config = {"_target_": "dgkit.compress.awq.WeightQuantize", "name": "rtn_w4", "algorithm": "rtn", "group": 32}
    result = compress_checkpoint(run / "checkpoints" / "best.ckpt", config, "rtn_w4")
    exported = export_checkpoint(result["checkpoint"], images_per_domain=4, bench_runs=1)
    folder = evaluate_export(exported)
    assert folder == run / "variants" / "onnx-rtn_w4"
    final = json.loads((folder / "final.json").read_text())
    assert final["tag"] == "ERM+ORT-RTN-W4"
    for key, value in result["after"].items():
        _, domain, split = key.split("/")
        assert final["scores"][domain][split] == pytest.approx(value, abs=1e-6)
    assert {r.tag for r in load_runs(run)} == {"ERM", "ERM+RTN-W4", "ERM+ORT-RTN-W4"}


def test_variant_labels_mark_target_calibration():
    from dgkit.compress.runner import variant_label

    assert variant_label("prune_magnitude", {"state": {"calibration": None}}) == "PRUNE-MAGNITUDE"
    assert variant_label("awq_w4", {"state": {"calibration": {"allow_target": False}}}) == "AWQ-W4"
    assert variant_label("awq_w4", {"state": {"calibration": {"allow_target": True}}}) == "AWQ-W4[target-calib]"


@pytest.mark.parametrize("group", ["norm1", "attn.qkv", "norm2", "mlp.act"])
def test_awq_folding_is_exact_on_sam_encoder_blocks(group):
    """SAM's windowed block pads the normalised tokens with zeros; every fold still leaves it unchanged."""
    from segment_anything.modeling.image_encoder import Block

    torch.manual_seed(0)
    block = Block(dim=32, num_heads=2, window_size=3, input_size=(5, 5)).eval()  # 5x5 grid: windows padded
    x = torch.randn(2, 5, 5, 32)
    before = block(x)
    balanced = {"norm1": "attn.qkv", "attn.qkv": "attn.proj", "norm2": "mlp.lin1", "mlp.act": "mlp.lin2"}[group]
    linear = block.get_submodule(balanced)
    s = torch.rand(linear.in_features, generator=torch.Generator().manual_seed(1)) * 3 + 0.2
    WeightQuantize._fold(block, group, linear, s, "blocks.0", {"scaled_activations": {}})
    torch.testing.assert_close(block(x), before, atol=1e-5, rtol=1e-4)


def test_awq_quantises_a_sam_encoder(tiny_cfg):
    datamodule, method = build(tiny_cfg("backbone=sam_tiny", "task=segmentation", "data.image_size=32"))
    link = WeightQuantize(bits=4, group=32, calibration={"images_per_domain": 4})
    state = link.transform(method, TransformContext(stage="after_fit", datamodule=datamodule))
    groups = state["report"]["groups"]
    assert {k.rsplit(".", 1)[1] for k in groups} == {"attn_in", "attn_out", "mlp_in", "mlp_out"}
    assert any(name.endswith("mlp.lin2") for name in state["layers"])
    assert state["report"]["logits_error"]["awq"] <= state["report"]["logits_error"]["rtn"] * 1.05
