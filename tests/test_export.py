"""Export to ONNX Runtime and ``torch.export``: parity with eager on real images, lossless ``MatMulNBits``
transcoding of quantised linears, checked folders (nothing left behind on failure), the manifest, predict.py from
an export folder, and the scripts' error messages."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from dgkit.checkpoint import load_checkpoint, load_checkpoint_and_data
from dgkit.compress.quantizer import QuantLinear
from dgkit.compress.runner import compress_checkpoint
from dgkit.export import folder as export_folder
from dgkit.export.folder import export_checkpoint, staged_folder
from dgkit.export.manifest import MANIFEST, build_manifest, data_config, read_manifest, write_manifest
from dgkit.export.onnx import OnnxGraphs, block_size_for, export_onnx, kernel_bits, model_bytes, pack_bits
from dgkit.export.parity import ParityError, ParityThresholds, parity_images
from dgkit.export.runtime import load_export, ort_session
from dgkit.predict import data_config_from_meta
from dgkit.run import train
from dgkit.variants import evaluate_domains
from tests.conftest import ROOT, folder_run_cfg, write_image_tree

AWQ_W4 = {"_target_": "dgkit.compress.awq.WeightQuantize", "name": "awq_w4", "bits": 4, "group": 32,
          "calibration": {"images_per_domain": 8}}  # fmt: skip
INT8 = {"_target_": "dgkit.compress.int8.Int8Quantize", "name": "int8", "calibration": {"images_per_domain": 8}}


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A 2-step quick-start run (timm test ViT, 32 px) on a folder tree of real image files; its run folder."""
    base = tmp_path_factory.mktemp("export")
    train(folder_run_cfg(base, write_image_tree(base / "tree")))
    return base / "run"


@pytest.fixture(scope="module")
def onnx_folder(run) -> Path:
    """``scripts/export.py`` on the run's best checkpoint, default output folder."""
    assert _script("export")([f"ckpt={run / 'checkpoints' / 'best.ckpt'}", "bench_runs=20"]) == 0
    return run / "exports" / "onnx"


@pytest.fixture(scope="module")
def awq_folder(run) -> Path:
    """The run compressed with AWQ W4 (group 32), exported to ONNX."""
    result = compress_checkpoint(run / "checkpoints" / "best.ckpt", AWQ_W4, "awq_w4")
    return export_checkpoint(result["checkpoint"], bench_runs=20)


def _real_images(ckpt: Path) -> tuple[torch.Tensor, nn.Module]:
    """Images of every domain and split (evaluation pipeline) and the eager inference model, read independently
    of the export code."""
    _, datamodule, method = load_checkpoint_and_data(ckpt)
    splits = [datamodule.split(d, s) for d in datamodule.domains for s in ("in", "out")]
    x = torch.stack([split[i][0] for split in splits for i in range(min(3, len(split)))])
    return x, method.to_inference()


# ---- fp32 export: ONNX Runtime agrees with eager --------------------------------------------------------------
def test_onnx_export_agrees_with_eager_on_real_images(run, onnx_folder):
    assert sorted(p.name for p in onnx_folder.iterdir()) == ["bench.json", MANIFEST, "model.onnx", "parity.json"]
    x, eager = _real_images(run / "checkpoints" / "best.ckpt")
    exported = load_export(onnx_folder, threads=1)
    with torch.no_grad():
        expected, got = eager(x), exported(x)
    assert (got - expected).abs().max() <= 1e-4
    assert torch.equal(got.argmax(-1), expected.argmax(-1))

    parity = json.loads((onnx_folder / "parity.json").read_text())
    (check,) = parity["checks"]
    assert parity["passed"] and check["name"] == "float_runtime_vs_eager"
    assert check["max_abs_diff"] <= 1e-4 and check["top1_agreement"] == 1.0
    assert {g.split("/")[0] for g in parity["images"]} == {"night", "summer", "winter"}  # held-out domain too

    bench = json.loads((onnx_folder / "bench.json").read_text())
    assert bench["threads"] == 1 and bench["runs"] >= 20 and bench["file_bytes"] > 0
    assert set(bench["latency"]) == {"batch_1", "batch_32"}

    graph = onnx.load(str(onnx_folder / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["input"] and [o.name for o in graph.output] == ["logits"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a dynamic batch
    assert exported(x[:1]).shape == (1, 2)  # batch 1 after a batch-2 trace

    _, datamodule, method = load_checkpoint_and_data(run / "checkpoints" / "best.ckpt")  # evaluation takes it too
    assert evaluate_domains(exported, exported.task, datamodule) == evaluate_domains(eager, method.task, datamodule)


def test_torch_export_agrees_with_eager(run, onnx_folder, tmp_path):
    folder = export_checkpoint(run / "checkpoints" / "best.ckpt", tmp_path / "pt2", kind="torch", bench_runs=20)
    assert read_manifest(folder)["model"]["runtime"] == "torch.export"
    extra = (folder / "model.pt2").stat().st_size - (onnx_folder / "model.onnx").stat().st_size
    assert extra < 100_000  # weights and graph; not the storage of every parity image behind the traced example
    x, eager = _real_images(run / "checkpoints" / "best.ckpt")
    exported = load_export(folder)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), eager(x), atol=1e-4, rtol=0)
    assert exported(x[:1]).shape == (1, 2)


@pytest.mark.slow  # AOTInductor compiles C++: about a minute
def test_aoti_package_is_checked_too(run, tmp_path):
    folder = export_checkpoint(run / "checkpoints" / "best.ckpt", tmp_path / "aoti", kind="torch", aoti=True)
    checks = {c["name"]: c for c in json.loads((folder / "parity.json").read_text())["checks"]}
    assert checks["aoti_vs_eager"]["passed"] and read_manifest(folder)["model"]["aoti_file"] == "model_aoti.pt2"


# ---- quantised export: MatMulNBits from the layers' own codes -------------------------------------------------
VARIANTS = [(4, 32), (4, 64), (8, 32), (8, 64)]  # (bits, group)


class _Branch(nn.Module):
    """Token MLP (``MatMul`` path, with and without bias), then a pooled head (``Gemm`` path, with bias)."""

    def __init__(self, bits: int, group: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(bits * 100 + group)
        linears = [nn.Linear(192, 320), nn.Linear(320, 64, bias=False), nn.Linear(64, 33)]  # odd N; 3 or 5 blocks
        for linear in linears:
            with torch.no_grad():
                linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen) * 0.1)
                linear.weight[0, :7] = 0.75  # an outlier run: uneven groups
        self.fc1, self.fc2, self.head = (QuantLinear.from_linear(m, bits, group) for m in linears)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(nn.functional.gelu(self.fc1(x)))  # (B, T, 64)
        return self.head(h.mean(1))  # (B, 33)


class _QuantMLPs(nn.Module):
    """A shared layer called twice, then one branch per (bits, group) variant, outputs side by side (one export for
    all of them)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = QuantLinear.from_linear(nn.Linear(192, 192), 4, 64)
        self.branches = nn.ModuleList(_Branch(bits, group) for bits, group in VARIANTS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.shared(torch.tanh(self.shared(x)))  # two MatMul nodes for one layer
        return torch.cat([branch(x) for branch in self.branches], -1)  # (B, 33 * variants)


def test_matmul_nbits_transcoding_matches_fake_quant():
    model = _QuantMLPs().eval()
    graphs = export_onnx(model, torch.randn(2, 5, 192))
    ops = [n.op_type for n in graphs.final.graph.node]
    assert ops.count("MatMulNBits") == 3 * len(VARIANTS) + 2 and not {"MatMul", "Gemm", "Transpose"} & set(ops)
    expected_layers = [(f"branches.{i}.{n}", bits, group) for i, (bits, group) in enumerate(VARIANTS)
                       for n in ("fc1", "fc2", "head")] + [("shared", 4, 64)] * 2  # fmt: skip
    assert sorted((r.layer, r.kernel_bits, r.block_size) for r in graphs.nbits) == sorted(expected_layers)
    tensors = {t.name: t for t in graphs.final.graph.initializer}
    for i, (bits, group) in enumerate(VARIANTS):
        assert tensors[f"branches.{i}.fc1.nbits.B"].dims == [320, 192 // group, group * bits // 8]
    assert len(model_bytes(graphs.final)) < 0.45 * len(model_bytes(graphs.float))

    x = torch.randn(3, 5, 192, generator=torch.Generator().manual_seed(1))  # an odd batch
    got = torch.from_numpy(ort_session(model_bytes(graphs.final)).run(None, {"input": x.numpy()})[0])
    with torch.no_grad():
        expected = model(x)
    for i, variant in enumerate(VARIANTS):  # each variant on its own: one bad packing cannot hide in the others
        g, e = got[:, 33 * i : 33 * (i + 1)], expected[:, 33 * i : 33 * (i + 1)]
        assert ((g - e).norm() / e.norm()) <= 1e-4, variant
        assert (g - e).abs().max() <= 1e-4 * e.abs().max(), variant


def test_packing_helpers():
    assert pack_bits(np.array([[1, 2, 3]]), 4).tolist() == [[0x21, 0x03]]  # low nibble first, padded
    assert pack_bits(np.array([[1, 2, 3, 0, 1]]), 2).tolist() == [[0b00111001, 0b01]]
    assert pack_bits(np.array([[200, 7]]), 8).tolist() == [[200, 7]]
    assert [kernel_bits(b) for b in (2, 3, 4, 5, 8)] == [2, 4, 4, 8, 8]
    assert [block_size_for(g) for g in (16, 32, 48, 96, 128)] == [16, 32, 16, 32, 128]
    with pytest.raises(ValueError, match="power-of-two block"):
        block_size_for(24)


def test_awq_checkpoint_exports_to_matmul_nbits(awq_folder, run):
    assert awq_folder == run / "exports" / "onnx-awq_w4"
    manifest = read_manifest(awq_folder)
    layers = manifest["model"]["matmul_nbits"]
    _, method = load_checkpoint(manifest["source"]["checkpoint"])
    assert len(layers) == sum(isinstance(m, QuantLinear) for m in method.modules()) > 0
    assert {(r["bits"], r["block_size"]) for r in layers} == {(4, 32)}
    (calibration,) = manifest["calibration"]
    assert calibration["domains"] == ["summer", "winter"] and calibration["allow_target"] is False
    assert manifest["chain"][-1]["config"]["name"] == "awq_w4"

    checks = {c["name"]: c for c in json.loads((awq_folder / "parity.json").read_text())["checks"]}
    assert checks["float_runtime_vs_eager"]["max_abs_diff"] <= 1e-4
    quantised = checks["quantised_runtime_vs_fake_quant"]
    assert quantised["top1_agreement"] >= 0.99 and quantised["rel_l2"] < 1e-4

    x, eager = _real_images(Path(manifest["source"]["checkpoint"]))
    with torch.no_grad():
        expected = eager(x)
        got = load_export(awq_folder)(x)
    assert ((got - expected).norm() / expected.norm()) <= 1e-4


def test_int8_checkpoint_exports_through_the_qdq_pass(run):
    result = compress_checkpoint(run / "checkpoints" / "best.ckpt", INT8, "int8")
    folder = export_checkpoint(result["checkpoint"], bench_runs=20)
    assert folder == run / "exports" / "onnx-int8"
    manifest = read_manifest(folder)
    assert manifest["model"]["int8_qdq_layers"] and not manifest["model"]["matmul_nbits"]
    assert manifest["calibration"][0]["counts"] == {"summer": 8, "winter": 8}
    (check,) = json.loads((folder / "parity.json").read_text())["checks"]
    assert check["name"] == "quantised_runtime_vs_fake_quant" and check["top1_agreement"] >= 0.99
    ops = {n.op_type for n in onnx.load(str(folder / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


# ---- a failed export leaves nothing ---------------------------------------------------------------------------
def test_failed_parity_leaves_no_folder(run, onnx_folder, tmp_path, monkeypatch):
    model = onnx.load(str(onnx_folder / "model.onnx"))  # the graph of the real export, to skip re-exporting
    monkeypatch.setattr(export_folder, "export_onnx", lambda eager, example: OnnxGraphs(model, model, []))
    out = tmp_path / "exports" / "deep" / "onnx"
    with pytest.raises(ParityError, match="float_runtime_vs_eager: max_abs_diff"):
        export_checkpoint(run / "checkpoints" / "best.ckpt", out, thresholds=ParityThresholds(max_abs_diff=0.0))
    assert list(tmp_path.iterdir()) == []  # neither the folder, its temporary sibling, nor the parents made for it


def test_staged_folder_refuses_to_overwrite_and_replaces_on_request(tmp_path):
    out = tmp_path / "x"
    with staged_folder(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(FileExistsError, match="overwrite=true"), staged_folder(out):
        pass
    with staged_folder(out, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"] and [p.name for p in out.iterdir()] == ["b"]


# ---- the manifest --------------------------------------------------------------------------------------------
def test_manifest_round_trips_and_records_the_checkpoint(run, onnx_folder, tmp_path):
    manifest = read_manifest(onnx_folder)
    assert manifest == json.loads((onnx_folder / MANIFEST).read_text())
    _, method = load_checkpoint(run / "checkpoints" / "best.ckpt")
    meta = method.meta
    assert data_config(manifest) == data_config_from_meta(meta["data_config"])
    assert (manifest["classes"], manifest["domains"], manifest["test_domains"]) == (
        meta["classes"], meta["domains"], meta["test_domains"])  # fmt: skip
    assert manifest["task"] == meta["task"] and manifest["versions"]["onnxruntime"]
    assert set(manifest["files"]) == {"model.onnx", "parity.json", "bench.json"}
    assert manifest["parity"]["passed"] and manifest["model"]["input_shape"] == ["batch", 3, 32, 32]

    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "model.onnx").write_bytes(b"")
    meta = {
        **meta,
        "chain": [
            *meta["chain"],
            {
                "config": {"_target_": "x.Y"},
                "stage": "after_fit",
                "state": {"mask": torch.ones(3, 2), "calibration": {"domains": ["a"]}},
            },
        ],
    }
    built = build_manifest(meta, "onnx", {"file": "model.onnx", "runtime": "onnxruntime"}, copy)
    write_manifest(copy, built)
    assert read_manifest(copy) == built
    assert built["chain"][-1]["state"]["mask"] == {"tensor": {"shape": [3, 2], "dtype": "torch.float32"}}
    assert built["calibration"] == [{"link": "x.Y", "domains": ["a"]}]


def test_missing_or_foreign_manifest_is_a_clear_error(onnx_folder, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="has no manifest.json: not a dgkit export folder"):
        load_export(empty)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / MANIFEST).write_text(json.dumps({"format": "something-else", "model": "m.onnx"}))
    with pytest.raises(ValueError, match="format 'something-else', expected 'dgkit-export'"):
        load_export(foreign)
    manifest = json.loads((onnx_folder / MANIFEST).read_text())
    (foreign / MANIFEST).write_text(json.dumps({k: v for k, v in manifest.items() if k != "classes"}))
    with pytest.raises(ValueError, match=r"lacks \['classes'\]"):
        read_manifest(foreign)
    (foreign / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(FileNotFoundError, match=r"missing: \['bench.json', 'model.onnx', 'parity.json'\]"):
        read_manifest(foreign)

    assert _script("predict")([f"ckpt={empty}", f"images={onnx_folder}"]) == 2  # no images there: checked first
    write_image_tree(tmp_path / "imgs", per_class=1)
    assert _script("predict")([f"ckpt={empty}", f"images={tmp_path / 'imgs'}"]) == 2
    assert "has no manifest.json" in capsys.readouterr().err


# ---- predict.py from the checkpoint and from its export -------------------------------------------------------
def test_predict_gives_the_same_classes_from_checkpoint_and_export(run, onnx_folder, tmp_path):
    images = write_image_tree(tmp_path / "imgs", seed=3, per_class=3, size=40)  # resized to 32 by both
    predict = _script("predict")
    assert predict([f"ckpt={run / 'checkpoints' / 'best.ckpt'}", f"images={images}", f"out={tmp_path / 'a.csv'}"]) == 0
    assert predict([f"ckpt={onnx_folder}", f"images={images}"]) == 0  # default: beside the export folder
    from_ckpt = list(csv.DictReader((tmp_path / "a.csv").open()))
    from_export = list(csv.DictReader((onnx_folder.parent / "predictions-onnx.csv").open()))
    assert len(from_ckpt) == 18
    assert [(r["path"], r["class"]) for r in from_export] == [(r["path"], r["class"]) for r in from_ckpt]
    np.testing.assert_allclose([float(r["probability"]) for r in from_export],
                               [float(r["probability"]) for r in from_ckpt], atol=1e-5)  # fmt: skip


def test_export_script_errors_name_the_problem(tmp_path, capsys):
    main = _script("export")
    assert main(["export=onnx"]) == 2 and "ckpt= is required" in capsys.readouterr().err
    assert main([f"ckpt={tmp_path / 'x.ckpt'}", "export=tflite"]) == 2 and "choose one of" in capsys.readouterr().err
    assert main([f"ckpt={tmp_path / 'x.ckpt'}", "colour=red"]) == 2 and "unknown keys" in capsys.readouterr().err
    assert main([f"ckpt={tmp_path / 'x.ckpt'}"]) == 2 and "does not exist" in capsys.readouterr().err


def test_parity_images_cover_every_domain_and_split(run):
    _, datamodule, _ = load_checkpoint_and_data(run / "checkpoints" / "best.ckpt")
    images = parity_images(datamodule, per_domain=4, seed=0)
    assert set(images) == {f"{d}/{s}" for d in ("night", "summer", "winter") for s in ("in", "out")}
    assert all(x.shape[1:] == (3, 32, 32) for x in images.values())
    again = parity_images(datamodule, per_domain=4, seed=0)
    assert all(torch.equal(images[g], again[g]) for g in images)
