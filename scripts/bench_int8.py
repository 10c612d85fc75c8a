"""Batch-1 latency and output agreement: eager fp32 PyTorch vs ONNX Runtime fp32 vs ORT int8 QDQ (dgkit's int8 link).

    python scripts/bench_int8.py [--backbones small_cnn_lite resnet18] [--runs 30] [--images 32]

Random-init backbones (conf/backbone/<name>.yaml, native size) with a 7-class linear head; BatchNorm statistics are
first set from the random images (one train-mode pass), so a random ResNet-18 is not degenerate (timm zero-inits
each block's last BN). Latency: one thread everywhere, median process-CPU and wall ms over ``--runs`` calls after
5 warm-ups, variants interleaved so a loaded machine slows them alike.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from dgkit.chain import TransformContext
from dgkit.compress.int8 import Int8Quantize
from dgkit.export.bench import interleaved_ms
from dgkit.export.onnx import float_graph
from dgkit.export.qdq import quantize_qdq

CONF = Path(__file__).resolve().parents[1] / "conf" / "backbone"


class Classifier(nn.Module):
    """A backbone and a linear head, named as a dgkit method names them."""

    def __init__(self, backbone: nn.Module, classes: int = 7) -> None:
        super().__init__()
        self.backbone, self.classifier = backbone, nn.Linear(backbone.num_features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x))


class Images:
    """An in-memory two-domain datamodule: what calibration reads (source domains' ``in`` split)."""

    def __init__(self, images: torch.Tensor) -> None:
        half = len(images) // 2
        self.source_domains, self.test_domains = ["a", "b"], []
        self.data = {"a": images[:half], "b": images[half:]}

    def split(self, domain: str, split: str) -> list:
        return [(x, 0) for x in self.data[domain]]


def build(name: str, images: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    backbone = instantiate(OmegaConf.load(CONF / f"{name}.yaml"))
    model = Classifier(backbone)
    size = backbone.data_config.input_size
    x = torch.randn(images, 3, *size, generator=torch.Generator().manual_seed(0))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats(), nn.init.ones_(m.weight), setattr(m, "momentum", None)
    with torch.no_grad():
        model.train()(x)
    return model.eval(), x


def export(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(float_graph(model), (example,), str(path), dynamo=True, external_data=False,
                          verbose=False, input_names=["input"], output_names=["logits"],
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))  # fmt: skip
    return path


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def bench(name: str, runs: int, images: int, tmp: Path) -> None:
    model, x = build(name, images)
    quantised = copy.deepcopy(model)
    link = Int8Quantize(calibration={"images_per_domain": images // 2}, default_exclude=["classifier"])
    record = {"state": link.transform(quantised, TransformContext("after_fit", Images(x)))}
    fp32 = export(model, x[:2], tmp / f"{name}_fp32.onnx")
    quantize_qdq(fp32, tmp / f"{name}_int8.onnx", x, record)
    s32, s8 = session(fp32), session(tmp / f"{name}_int8.onnx")
    one = x[:1]
    with torch.no_grad():
        eager, fake = model(x).numpy(), quantised(x).numpy()
        runners = {"eager fp32": model, "ORT fp32": lambda v: s32.run(None, {"input": v.numpy()}),
                   "ORT int8 QDQ": lambda v: s8.run(None, {"input": v.numpy()})}  # fmt: skip
        results = interleaved_ms(runners, one, runs=runs, warmup=5)
    out32, out8 = s32.run(None, {"input": x.numpy()})[0], s8.run(None, {"input": x.numpy()})[0]

    def rel(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    print(f"\n{name} ({tuple(x.shape[1:])}, {record['state']['report']['layers']} int8 layers, "
          f"{record['state']['report']['folded_batchnorms']} BNs folded; {runs} runs, 1 thread)")  # fmt: skip
    for key, t in results.items():
        print(f"  {key:13s} CPU {t['cpu_ms']:7.2f} ms   wall {t['wall_ms']:7.2f} ms")
    sizes = {p.stem: p.stat().st_size / 2**20 for p in (fp32, tmp / f"{name}_int8.onnx")}
    print(f"  files: {', '.join(f'{k} {v:.2f} MB' for k, v in sizes.items())}")
    print(f"  ORT fp32 vs eager: max |diff| {np.abs(out32 - eager).max():.2g}")
    top1 = (out8.argmax(1) == fake.argmax(1)).mean()
    print(f"  ORT int8 vs fake-quant: top-1 {top1:.3f}, max |diff| {np.abs(out8 - fake).max():.3g}, "
          f"rel_l2 {rel(out8, fake):.2g}")  # fmt: skip
    print(f"  int8 vs fp32 (quantisation error): rel_l2 ORT {rel(out8, out32):.3g}, fake-quant {rel(fake, eager):.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["small_cnn_lite", "resnet18"])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--images", type=int, default=32, help="calibration and agreement images")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.backbones:
            bench(name, args.runs, args.images, Path(tmp))


if __name__ == "__main__":
    main()
