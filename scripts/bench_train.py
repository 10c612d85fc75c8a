"""Training throughput: dgkit's ERM (Lightning, default callbacks and logger) vs a plain PyTorch loop.

Same model, data pipeline, per-domain batch size, optimiser and thread count; the two are interleaved
(A B A B ...) and the median steps/s of each is reported with their ratio, plus the data loader's own
throughput (how much of a step is spent loading data). Every loop runs exactly ``--steps`` steps, drawing from
dgkit's endless per-domain streams (a finite loader would be cycled), and the script checks that the step counts
agree before it compares rates: a pass over the data shorter than ``--steps`` changes nothing.

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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from dgkit.compose import build, build_trainer  # noqa: E402
from dgkit.config import register_resolvers  # noqa: E402
from dgkit.utils.cli import parse_with_overrides  # noqa: E402

T = TypeVar("T")


class _StepClock(pl.Callback):
    """Times every training step (batch start to batch end, data loading included)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, *args) -> None:
        """Record the end of a step."""
        self.ends.append(time.perf_counter())


@dataclass(frozen=True)
class LoopTiming:
    """What one timed loop did: ``steps`` run in all (warm-up included) and steps/s after the warm-up."""

    steps: int
    rate: float


def _cfg(args: argparse.Namespace, out: Path) -> DictConfig:
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


def timing(ends: list[float], warmup: int) -> LoopTiming:
    """Steps/s between the end of step ``warmup`` and the end of the last step of ``ends`` (step end times).

    Raises:
        ValueError: fewer than ``warmup + 2`` steps, which leaves no interval to time.
    """
    if len(ends) < warmup + 2:
        raise ValueError(f"{len(ends)} steps timed with {warmup} warm-up steps: need at least {warmup + 2}")
    return LoopTiming(len(ends), (len(ends) - 1 - warmup) / (ends[-1] - ends[warmup]))


def take(make: Callable[[], Iterable[T]], steps: int) -> Iterator[T]:
    """Exactly ``steps`` items of ``make()``, starting ``make()`` again whenever it ends.

    dgkit's training loader is endless (one :class:`~dgkit.data.datamodule.DomainStream` per domain); cycling
    keeps every loop at ``steps`` even for a finite loader, so the loops compared always run the same steps.

    Raises:
        ValueError: ``make()`` yields nothing.
    """
    done = 0
    while done < steps:
        before = done
        for item in make():
            yield item
            done += 1
            if done == steps:
                return
        if done == before:
            raise ValueError("the training loader yields no batches")


def run_dgkit(cfg: DictConfig, out: Path, warmup: int) -> LoopTiming:
    """Steps/s of ``trainer.fit`` with dgkit's own trainer setup (progress bar, logger, checkpointing)."""
    pl.seed_everything(0, verbose=False)
    datamodule, method = build(cfg)
    trainer = build_trainer(cfg, out, {}, method)
    clock = _StepClock()
    trainer.callbacks.append(clock)
    trainer.fit(method, datamodule=datamodule)
    return timing(clock.ends, warmup)


def plain_loop(datamodule, method: torch.nn.Module, steps: int, warmup: int) -> LoopTiming:
    """Steps/s of a hand-written ERM loop: ``steps`` batches of ``datamodule.train_dataloader()`` (cycled),
    ``method``'s forward, cross-entropy, and ``method.optimizer_factory``'s optimiser."""
    model = method.train()
    optimizer = method.optimizer_factory([p for p in model.parameters() if p.requires_grad])
    ends = []
    for batch, _, _ in take(datamodule.train_dataloader, steps):
        x = torch.cat([b[0] for b in batch.values()])  # (D·B, C, H, W): every source domain's batch
        y = torch.cat([b[1] for b in batch.values()])
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ends.append(time.perf_counter())
    return timing(ends, warmup)


def data_loop(datamodule, steps: int, warmup: int) -> LoopTiming:
    """Batches/s of ``steps`` batches of the training loader alone (cycled; no model)."""
    ends = []
    for _ in take(datamodule.train_dataloader, steps):
        ends.append(time.perf_counter())
    return timing(ends, warmup)


def run_plain(cfg: DictConfig, warmup: int) -> LoopTiming:
    """:func:`plain_loop` over ``cfg``'s loaders, model and optimiser for ``trainer.max_steps`` steps."""
    pl.seed_everything(0, verbose=False)
    datamodule, method = build(cfg)
    return plain_loop(datamodule, method, cfg.trainer.max_steps, warmup)


def run_data(cfg: DictConfig, warmup: int) -> LoopTiming:
    """:func:`data_loop` over ``cfg``'s training loader for ``trainer.max_steps`` steps."""
    datamodule, _ = build(cfg)
    return data_loop(datamodule, cfg.trainer.max_steps, warmup)


def same_steps(timings: dict[str, list[LoopTiming]]) -> int:
    """The one step count of every timed loop.

    Raises:
        RuntimeError: two loops ran different numbers of steps (their rates would not be comparable).
    """
    counts = {name: sorted({t.steps for t in ts}) for name, ts in timings.items()}
    if len({c for cs in counts.values() for c in cs}) != 1:
        raise RuntimeError(f"the loops ran different numbers of steps: {counts}")
    return next(iter(counts.values()))[0]


def measure(args: argparse.Namespace) -> dict[str, list[LoopTiming]]:
    """Interleave dgkit and the plain loop ``args.repeats`` times, then time the loader alone; every loop runs
    ``args.steps`` steps (checked)."""
    torch.set_num_threads(args.threads)
    timings: dict[str, list[LoopTiming]] = {"dgkit": [], "plain": [], "data": []}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _cfg(args, Path(tmp))
        for r in range(args.repeats):
            timings["dgkit"].append(run_dgkit(cfg, Path(tmp) / f"r{r}", args.warmup))
            timings["plain"].append(run_plain(cfg, args.warmup))
            d, p = timings["dgkit"][-1].rate, timings["plain"][-1].rate
            print(f"repeat {r}: dgkit {d:.2f} steps/s, plain {p:.2f} steps/s", flush=True)
        timings["data"].append(run_data(cfg, args.warmup))
    same_steps(timings)
    return timings


def parser() -> argparse.ArgumentParser:
    """The command line (Hydra overrides are parsed apart)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", default="quickstart")
    p.add_argument("--steps", type=int, default=40, help="steps of every loop (the loader is cycled)")
    p.add_argument("--warmup", type=int, default=5, help="steps of every loop left out of the timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.epilog = "Hydra overrides (key=value) may follow anywhere, or after --."
    return p


def main(argv: list[str] | None = None) -> dict[str, list[LoopTiming]]:
    """Run the interleaved benchmark, print the table and the ratio, and return every loop's timings."""
    p = parser()
    args, args.overrides = parse_with_overrides(p, argv)
    if args.steps < args.warmup + 2:
        p.error(f"--steps={args.steps} must be at least --warmup + 2 = {args.warmup + 2}")
    timings = measure(args)
    d = statistics.median(t.rate for t in timings["dgkit"])
    pl_ = statistics.median(t.rate for t in timings["plain"])
    data_rate = timings["data"][0].rate
    print(f"\nmachine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads={args.threads}")
    print(
        f"config: +exp={args.exp} {' '.join(args.overrides)} ({args.steps} steps in every loop, {args.warmup} warm-up, "
        f"{args.repeats} interleaved repeats)"
    )
    print("| loop | steps | steps/s (median) |\n|---|---|---|")
    print(f"| dgkit ERM (Lightning) | {args.steps} | {d:.3f} |\n| plain PyTorch loop | {args.steps} | {pl_:.3f} |")
    print(f"| data loader alone | {args.steps} | {data_rate:.1f} |")
    print(f"\nratio dgkit / plain: {d / pl_:.3f}")
    print(f"data loading share of a plain step: {100 * pl_ / data_rate:.1f}%")
    return timings


if __name__ == "__main__":
    main()
