"""Cost of every objective in ``conf/method/*.yaml`` per training step, relative to ERM, in one run.

Each method is composed as ``+exp=<exp> method=<name>`` (same backbone, data, per-domain batch size and
thread count), built by dgkit's composition root and trained by a real Lightning fit of ``--steps`` steps.
A callback times every training step from ``on_train_batch_start`` to ``on_train_batch_end``: forward,
backward(s) and optimiser step(s), automatic or manual, without data loading. Methods are interleaved
(ERM, DANN, ..., then again) so background load drifts hit all of them alike; the reported figure is the
median over all timed steps after ``--warmup`` per fit. Methods with a ``warmup_steps`` key (UDIM's SAM
warm-up) are run with ``warmup_steps=0`` so that their own step is what gets timed.

    python scripts/bench_methods.py                              # quickstart: digits_dg, small CNN lite
    python scripts/bench_methods.py --steps 30 --repeats 3 backbone=resnet18 data.image_size=64
    python scripts/bench_methods.py --steps 10 --repeats 1 --warmup 2 data=synthetic   # smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from dgkit.compose import build, build_trainer  # noqa: E402
from dgkit.config import register_resolvers  # noqa: E402
from dgkit.utils.cli import parse_with_overrides  # noqa: E402

METHODS = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))


class _StepTimer(pl.Callback):
    """Seconds of every training step, batch start to batch end (data loading excluded)."""

    def __init__(self) -> None:
        self.start = 0.0
        self.seconds: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        """Start the clock."""
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        """Stop the clock and record the step."""
        self.seconds.append(time.perf_counter() - self.start)


def _cfg(args: argparse.Namespace, method: str, out: Path) -> DictConfig:
    """The experiment with ``method`` swapped in, no evaluation, no logger, no progress bar."""
    register_resolvers()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"+exp={args.exp}",
                f"method={method}",
                f"trainer.max_steps={args.steps}",
                "++trainer.limit_val_batches=0",  # no evaluation (the key is not in conf/trainer)
                "trainer.accelerator=cpu",
                "trainer.enable_progress_bar=false",
                "logger=none",
                f"output_dir={out}",
                *args.overrides,
            ],
        )
    if "warmup_steps" in cfg.method:
        with open_dict(cfg):
            cfg.method.warmup_steps = 0
    return cfg


def time_method(cfg: DictConfig, out: Path, warmup: int) -> list[float]:
    """Seconds per step of one Lightning fit of ``cfg``, warm-up steps dropped."""
    pl.seed_everything(0, verbose=False)
    datamodule, method = build(cfg)
    trainer = build_trainer(cfg, out, {}, method)
    timer = _StepTimer()
    trainer.callbacks.append(timer)
    trainer.fit(method, datamodule=datamodule)
    return timer.seconds[warmup:]


def main(argv: list[str] | None = None) -> None:
    """Run every method interleaved and print the markdown table and the machine."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", default="quickstart")
    p.add_argument("--methods", nargs="+", default=METHODS, help=f"default: all of {', '.join(METHODS)}")
    p.add_argument("--steps", type=int, default=30, help="training steps per fit")
    p.add_argument("--warmup", type=int, default=5, help="steps of each fit left out of the timing")
    p.add_argument("--repeats", type=int, default=3, help="interleaved fits per method")
    p.add_argument("--threads", type=int, default=1)
    p.epilog = "Hydra overrides (key=value, applied to every method) may follow anywhere, or after --."
    args, args.overrides = parse_with_overrides(p, argv)
    if args.steps <= args.warmup:
        p.error(f"--steps={args.steps} must exceed --warmup={args.warmup}")
    methods = list(dict.fromkeys(["erm", *args.methods]))  # ERM is the reference
    torch.set_num_threads(args.threads)
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for m in methods:
                step_times = time_method(_cfg(args, m, Path(tmp) / f"{m}-{r}"), Path(tmp) / f"{m}-{r}", args.warmup)
                seconds[m] += step_times
                print(f"repeat {r} {m}: {statistics.median(step_times):.4f} s/step", flush=True)
    median = {m: statistics.median(s) for m, s in seconds.items()}
    cpu = platform.processor() or platform.machine()
    print(f"\nmachine: {cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}, "
          f"Python {platform.python_version()}, torch {torch.__version__}, threads={args.threads}")  # fmt: skip
    print(f"config: +exp={args.exp} {' '.join(args.overrides)} ({args.steps} steps per fit, {args.warmup} warm-up, "
          f"{args.repeats} interleaved repeats; warmup_steps=0 where a method has one)")  # fmt: skip
    print("\n| method | s/step (median) | ratio to ERM |\n|---|---|---|")
    for m in methods:
        print(f"| {m} | {median[m]:.4f} | {median[m] / median['erm']:.2f} |")


if __name__ == "__main__":
    main()
