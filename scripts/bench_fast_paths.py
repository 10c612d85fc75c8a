"""Steps/s of the speed options against the default, on one experiment: ``trainer.precision=bf16-mixed``,
``trainer.compile=true``, ``trainer.channels_last=true``.

Each variant is a real Lightning fit built by dgkit's composition root (``scripts/bench_methods.py``'s
``_cfg`` and ``time_method``: steps timed from batch start to batch end, data loading excluded, no evaluation).
Variants are interleaved (default, bf16, compile, channels_last, then again) so background load hits all alike;
the figure is the median over every timed step after ``--warmup`` per fit (compilation happens in the warm-up).

    python scripts/bench_fast_paths.py                               # quickstart, ERM, 1 thread
    python scripts/bench_fast_paths.py --steps 30 --repeats 3 method=sharpness
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_methods import _cfg, time_method  # noqa: E402

from dgkit.utils.cli import parse_with_overrides  # noqa: E402

VARIANTS = {
    "default (32-true)": [],
    "bf16-mixed": ["trainer.precision=bf16-mixed"],
    "compile": ["trainer.compile=true"],
    "channels_last": ["trainer.channels_last=true"],
}


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the variants interleaved; print the markdown table and the machine; return s/step per variant."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", default="quickstart")
    p.add_argument("--method", default="erm")
    p.add_argument("--steps", type=int, default=20, help="training steps per fit")
    p.add_argument("--warmup", type=int, default=5, help="steps of each fit left out of the timing")
    p.add_argument("--repeats", type=int, default=2, help="interleaved fits per variant")
    p.add_argument("--threads", type=int, default=1)
    p.epilog = "Hydra overrides (key=value, applied to every variant) may follow anywhere, or after --."
    args, overrides = parse_with_overrides(p, argv)
    if args.steps <= args.warmup:
        p.error(f"--steps={args.steps} must exceed --warmup={args.warmup}")
    torch.set_num_threads(args.threads)
    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for i, (name, extra) in enumerate(VARIANTS.items()):
                out = Path(tmp) / f"{i}-{r}"
                args.overrides = [*overrides, *extra]
                step_times = time_method(_cfg(args, args.method, out), out, args.warmup)
                seconds[name] += step_times
                print(f"repeat {r} {name}: {statistics.median(step_times):.4f} s/step", flush=True)
    median = {v: statistics.median(s) for v, s in seconds.items()}
    cpu = platform.processor() or platform.machine()
    print(f"\nmachine: {cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}, "
          f"Python {platform.python_version()}, torch {torch.__version__}, threads={args.threads}")  # fmt: skip
    print(f"config: +exp={args.exp} method={args.method} {' '.join(overrides)} ({args.steps} steps per fit, "
          f"{args.warmup} warm-up, {args.repeats} interleaved repeats)")  # fmt: skip
    reference = median["default (32-true)"]
    print("\n| variant | s/step (median) | steps/s | speed vs default |\n|---|---|---|---|")
    for v, s in median.items():
        print(f"| {v} | {s:.4f} | {1 / s:.2f} | {reference / s:.2f}× |")
    return median


if __name__ == "__main__":
    main()
