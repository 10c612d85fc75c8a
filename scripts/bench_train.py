"""Training throughput: dgkit's ERM (Lightning, default callbacks and logger) vs a plain PyTorch loop.

Same model, data pipeline, per-domain batch size, optimiser and thread count; the two are interleaved
(A B A B ...) and the median steps/s of each is reported with their ratio, plus the data loader's own
throughput (how much of a step is spent loading data).

    python scripts/bench_train.py                      # digits_dg, small CNN, 1 thread
    python scripts/bench_train.py --threads 2 --steps 60 --repeats 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

from dgkit.compose import build, build_trainer  # noqa: E402
from dgkit.config import register_resolvers  # noqa: E402
from dgkit.utils.cli import parse_with_overrides  # noqa: E402


class _StepClock(pl.Callback):
    """Times every training step (batch start to batch end, data loading included)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, *args) -> None:
        self.ends.append(time.perf_counter())


def _cfg(args, out: Path):
    register_resolvers()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                f"+exp={args.exp}",
                f"trainer.max_steps={args.steps}",
                "++trainer.limit_val_batches=0",
                "trainer.accelerator=cpu",
                f"output_dir={out}",
                *args.overrides,
            ],
        )


def _rate(ends: list[float], warmup: int) -> float:
    return (len(ends) - 1 - warmup) / (ends[-1] - ends[warmup])


def run_dgkit(cfg, out: Path, warmup: int) -> float:
    """Steps/s of ``trainer.fit`` with dgkit's own trainer setup (progress bar, logger, checkpointing)."""
    pl.seed_everything(0, verbose=False)
    datamodule, method = build(cfg)
    trainer = build_trainer(cfg, out, {}, method)
    clock = _StepClock()
    trainer.callbacks.append(clock)
    trainer.fit(method, datamodule=datamodule)
    return _rate(clock.ends, warmup)


def run_plain(cfg, warmup: int) -> float:
    """Steps/s of a hand-written loop over the same loaders, model and optimiser."""
    pl.seed_everything(0, verbose=False)
    datamodule, method = build(cfg)
    model = method.train()
    optimizer = method.optimizer_factory([p for p in model.parameters() if p.requires_grad])
    ends = []
    for step, (batch, _, _) in enumerate(datamodule.train_dataloader()):
        if step == cfg.trainer.max_steps:
            break
        x = torch.cat([b[0] for b in batch.values()])
        y = torch.cat([b[1] for b in batch.values()])
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ends.append(time.perf_counter())
    return _rate(ends, warmup)


def run_data(cfg, warmup: int) -> float:
    """Batches/s of the training loader alone (no model)."""
    datamodule, _ = build(cfg)
    ends = []
    for step, _ in enumerate(datamodule.train_dataloader()):
        if step == cfg.trainer.max_steps:
            break
        ends.append(time.perf_counter())
    return _rate(ends, warmup)


def main(argv: list[str] | None = None) -> None:
    """Run the interleaved benchmark and print the table and the ratio."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", default="quickstart")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.epilog = "Hydra overrides (key=value) may follow anywhere, or after --."
    args, args.overrides = parse_with_overrides(p, argv)
    torch.set_num_threads(args.threads)
    dgkit_rates, plain_rates = [], []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _cfg(args, Path(tmp))
        for r in range(args.repeats):
            dgkit_rates.append(run_dgkit(cfg, Path(tmp) / f"r{r}", args.warmup))
            plain_rates.append(run_plain(cfg, args.warmup))
            print(f"repeat {r}: dgkit {dgkit_rates[-1]:.2f} steps/s, plain {plain_rates[-1]:.2f} steps/s", flush=True)
        data_rate = run_data(cfg, args.warmup)
    d, pl_ = statistics.median(dgkit_rates), statistics.median(plain_rates)
    print(f"\nmachine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads={args.threads}")
    print(
        f"config: +exp={args.exp} {' '.join(args.overrides)} ({args.steps} steps, {args.warmup} warm-up, "
        f"{args.repeats} interleaved repeats)"
    )
    print("| loop | steps/s (median) |\n|---|---|")
    print(f"| dgkit ERM (Lightning) | {d:.3f} |\n| plain PyTorch loop | {pl_:.3f} |")
    print(f"| data loader alone | {data_rate:.1f} |")
    print(f"\nratio dgkit / plain: {d / pl_:.3f}")
    print(f"data loading share of a plain step: {100 * pl_ / data_rate:.1f}%")


if __name__ == "__main__":
    main()
