"""Inference cost of AdaNPC's k-NN memory: time per test batch with the memory vs the plain model.

The model is a backbone from ``conf/backbone`` (default: the digits' ``small_cnn_lite`` at 32 px) with a linear
head; AdaNPC holds a memory of ``--bank`` source rows (random unit vectors: the cost does not depend on their
values). Two AdaNPC settings are timed against the plain forward, interleaved batch by batch (none, fixed,
growing, none, ...) on the same batches; each figure is the median over ``--repeats`` rounds of ``--batches``
batches (a fresh memory per round):

- ``fixed``: the memory stays at ``--bank`` rows (``beta=1.1``: no test row is accepted);
- ``growing``: every test sample is also accepted (``beta=0``), up to ``max_test_entries=--bank`` extra rows
  (FIFO): informative, the memory grows beyond ``--bank`` rows.

The target (at most 1.30) is checked on ``fixed``. The k-NN costs one ``(B, M)`` matmul and a top-k
(``torch.topk``, most of the added time) per batch, so the ratio shrinks with a heavier backbone.

    python scripts/bench_tta.py                           # 10,000 rows, batch 64, 1 thread
    python scripts/bench_tta.py --backbone resnet18 --bank 10000 --threads 1

Prints the ratios (AdaNPC time / plain time); the target is at most 1.30 for a 10,000-row memory.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dgkit.tta import AdaNPC  # noqa: E402


def _model(backbone_name: str, size: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    cfg = OmegaConf.load(ROOT / "conf" / "backbone" / f"{backbone_name}.yaml")
    cfg = OmegaConf.merge(OmegaConf.create({"data": {"image_size": size}}), {"b": cfg}).b
    for key in ("weights", "pretrained"):
        if key in cfg:
            cfg[key] = None if key == "weights" else False
    backbone = instantiate(cfg).eval()
    return backbone, nn.Linear(backbone.num_features, num_classes).eval()


def _adanpc(backbone: nn.Module, head: nn.Module, bank: int, num_classes: int, growing: bool) -> AdaNPC:
    tta = AdaNPC(k=100, tau=0.1, beta=0.0 if growing else 1.1, max_test_entries=bank if growing else 0)
    size = backbone.data_config.input_size
    tta.bind(backbone, head, [(torch.zeros(2, 3, *size), torch.tensor([0, 1]))])
    g = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(bank, backbone.num_features, generator=g), dim=1)
    tta.load_source(features, torch.randint(0, num_classes, (bank,), generator=g))
    return tta


def _cpu() -> str:
    """The CPU model name (Linux), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _time(predict, x: torch.Tensor) -> float:
    """Seconds for one batch."""
    start = time.perf_counter()
    with torch.inference_mode():
        predict(x)
    return time.perf_counter() - start


def main() -> None:
    """Run the interleaved measurement and print medians and ratios."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="small_cnn_lite")
    p.add_argument("--size", type=int, default=32, help="input side (px)")
    p.add_argument("--bank", type=int, default=10_000, help="source rows in the memory")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=20, help="batches per round")
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--classes", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backbone, head = _model(args.backbone, args.size, args.classes)
    batches = [torch.randn(args.batch_size, 3, args.size, args.size) for _ in range(args.batches)]

    def plain(x: torch.Tensor) -> torch.Tensor:
        return head(backbone(x))

    for x in batches[:3]:
        _time(plain, x)  # warm-up
    runs: dict[str, list[float]] = {"none": [], "adanpc fixed": [], "adanpc growing": []}
    for _ in range(args.repeats):
        fixed = _adanpc(backbone, head, args.bank, args.classes, False)
        growing = _adanpc(backbone, head, args.bank, args.classes, True)
        for x in batches:  # interleaved batch by batch, so a change in machine load hits all three alike
            runs["none"].append(_time(plain, x))
            runs["adanpc fixed"].append(_time(fixed.predict, x))
            runs["adanpc growing"].append(_time(growing.predict, x))
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"machine: {_cpu()}, {args.threads} thread(s), torch {torch.__version__}")
    print(f"backbone {args.backbone} {args.size}px, batch {args.batch_size}, memory {args.bank} source rows, k=100")
    print(f"{'':16}{'ms/batch':>10}{'ratio':>8}")
    for name, seconds in med.items():
        print(f"{name:16}{1e3 * seconds:10.2f}{seconds / med['none']:8.2f}")
    ratio = med["adanpc fixed"] / med["none"]
    verdict = "met" if ratio <= 1.3 else "MISSED"
    print(f"AdaNPC ({args.bank}-row memory) / none time ratio: {ratio:.2f} (target <= 1.30: {verdict})")


if __name__ == "__main__":
    main()
