"""Adapter cost: training step time relative to full fine-tuning, inference time after merge relative to the base.

Every adapter is built through the composition root (``build``) on the same backbone and measured in one
process, interleaved round by round (A B C ... A B C ...), and every inference call alternates base / merged / unmerged,
so machine load hits all alike; each call is timed alone and medians are reported. A training step is
forward + backward + optimiser step on one batch (``batch`` images per
source domain, the data pipeline excluded); inference is a no-grad forward in eval mode, unmerged and after
``dgkit.adapters.merge``, against the base model without any adapter.

    python scripts/bench_adapters.py                                    # vit_digits on 32 px digits, 1 thread
    python scripts/bench_adapters.py --adapters none lora soma --rounds 7 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

from dgkit.adapters import count_parameters, merge  # noqa: E402
from dgkit.compose import build  # noqa: E402
from dgkit.config import register_resolvers  # noqa: E402
from dgkit.utils.cli import parse_with_overrides  # noqa: E402


def _method(args, adapter: str):
    register_resolvers()
    overrides = [f"backbone={args.backbone}", f"adapter={adapter}", "data=digits_dg", "output_dir=/tmp/bench"]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, *args.overrides])
    _, method = build(cfg)
    return method


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    """Measure and print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", nargs="+", default=["none", "lora", "dora", "soma", "pego", "salt"])
    parser.add_argument("--backbone", default="vit_digits")
    parser.add_argument("--batch", type=int, default=96, help="training batch (3 source domains x 32)")
    parser.add_argument("--eval-batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="timed calls per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.epilog = "Hydra overrides (key=value) may follow anywhere, or after --."
    args, args.overrides = parse_with_overrides(parser)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    methods = {a: _method(args, a) for a in args.adapters}
    base = methods.get("none") or _method(args, "none")
    side = base.backbone.data_config.input_size
    x, y = torch.randn(args.batch, 3, *side), torch.randint(0, 10, (args.batch,))
    x_eval = torch.randn(args.eval_batch, 3, *side)
    merged = {}
    for name, method in methods.items():
        m = copy.deepcopy(method).eval()
        merge(m.backbone)
        merged[name] = m
    optimizers = {
        a: torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-4) for a, m in methods.items()
    }
    base_eval = copy.deepcopy(base).eval()

    def train_step(name):
        def step():
            methods[name].train()
            optimizers[name].zero_grad()
            F.cross_entropy(methods[name](x), y).backward()
            optimizers[name].step()

        return step

    def infer(model):
        def forward():
            with torch.no_grad():
                model(x_eval)

        return forward

    rows = {a: {"train": [], "unmerged": [], "merged": [], "base": []} for a in methods}
    for name in methods:  # warm-up
        train_step(name)()
        infer(merged[name])()
    for _ in range(args.rounds):
        for name in methods:
            for _ in range(args.steps):  # per call, alternating base / merged / unmerged: load hits all alike
                rows[name]["train"].append(_time(train_step(name)))
                rows[name]["base"].append(_time(infer(base_eval)))
                rows[name]["merged"].append(_time(infer(merged[name])))
                rows[name]["unmerged"].append(_time(infer(methods[name].eval())))
    full_ft = statistics.median(rows["none"]["train"]) if "none" in rows else float("nan")

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), "
          f"torch {torch.__version__}; backbone {args.backbone}, train batch {args.batch}, eval batch "
          f"{args.eval_batch}, {args.rounds} rounds x {args.steps} calls, median per call")  # fmt: skip
    print("| adapter | trainable params (backbone) | train step (ms) | step vs full FT | inference unmerged vs base "
          "| inference merged vs base |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        trainable, total = count_parameters(methods[name].backbone)
        step = statistics.median(r["train"])
        ratios = [statistics.median(a / b for a, b in zip(r[k], r["base"])) for k in ("unmerged", "merged")]
        print(f"| {name} | {trainable:,} ({trainable / total:.1%}) | {step * 1000:.0f} | {step / full_ft:.2f} "
              f"| {ratios[0]:.2f} | {ratios[1]:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
