"""Throughput regression check (``make bench``): a table of speed ratios, compared with the committed ones.

Ratios only, never absolute times: they survive a change of machine far better, and each is measured within one
run. Every ratio reads "higher is faster", so a drop is a slowdown:

- ``dgkit_vs_plain``: dgkit's ERM steps/s (Lightning, dgkit's trainer setup) / a plain PyTorch loop's, on the same
  model, loaders and optimiser (``scripts/bench_train.py``'s loops, interleaved, the same number of steps);
- ``loader_vs_model``: the training loader's batches/s alone / the plain loop's steps/s (how many batches the
  loader delivers in the time of one training step; near 1 the loader sets the pace);
- ``<method>_vs_erm``: ERM's seconds per step / the method's (its relative speed; the inverse of
  ``scripts/bench_methods.py``'s cost ratio, e.g. 0.57 for a step that costs 1.76 ERM steps).

The figures are compared with ``docs/bench_ratios.json`` (written by ``--save``); a ratio more than
``--tolerance`` (15 %) below its committed value is reported, and ``--strict`` makes that a non-zero exit.
Compare runs of the same configuration only: the script says so when the baseline's differs.

    python scripts/bench_ratios.py                      # measure, print, compare with docs/bench_ratios.json
    python scripts/bench_ratios.py --save               # ... and make these figures the new baseline
    python scripts/bench_ratios.py --methods erm dann --strict data.batch_size=16
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_methods  # noqa: E402
import bench_train  # noqa: E402

from dgkit.utils.cli import parse_with_overrides  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "docs" / "bench_ratios.json"
METHODS = ["erm", "dann", "sharpness", "udim", "simclr"]
SIZES = ["data.batch_size=8"]  # small: the check takes about a minute on one core
NOTE = "Measured on a loaded 2-core machine, one thread: a baseline for regressions, not a speed claim."


@dataclass(frozen=True)
class Change:
    """One ratio now and in the baseline (``None``: absent there); ``regression``: it dropped by more than the
    tolerance."""

    name: str
    current: float | None
    baseline: float | None
    regression: bool

    @property
    def relative(self) -> float | None:
        """``current / baseline - 1`` (``None`` when either is missing)."""
        if self.current is None or not self.baseline:
            return None
        return self.current / self.baseline - 1


def compare(current: Mapping[str, float], baseline: Mapping[str, float], tolerance: float = 0.15) -> list[Change]:
    """Every ratio of ``current`` and ``baseline`` (current's order, then those only in the baseline); a ratio is a
    regression when it is below ``(1 - tolerance)`` times its baseline. Ratios on one side only are never one.

    Raises:
        ValueError: ``tolerance`` is not in [0, 1).
    """
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance={tolerance}: must be in [0, 1)")
    names = list(current) + [n for n in baseline if n not in current]
    changes = []
    for n in names:
        now, then = current.get(n), baseline.get(n)
        dropped = now is not None and then is not None and now < (1 - tolerance) * then
        changes.append(Change(n, now, then, dropped))
    return changes


def ratios(loops: Mapping[str, list[bench_train.LoopTiming]], seconds: Mapping[str, list[float]]) -> dict[str, float]:
    """The ratios (module docstring) from :func:`bench_train.measure`'s timings and per-method step seconds."""
    dgkit = statistics.median(t.rate for t in loops["dgkit"])
    plain = statistics.median(t.rate for t in loops["plain"])
    loader = statistics.median(t.rate for t in loops["data"])
    out = {"dgkit_vs_plain": dgkit / plain, "loader_vs_model": loader / plain}
    erm = statistics.median(seconds["erm"])
    out.update({f"{m}_vs_erm": erm / statistics.median(s) for m, s in seconds.items() if m != "erm"})
    return out


def measure(args: argparse.Namespace) -> dict[str, float]:
    """Run bench_train's loops, then every method interleaved ``args.repeats`` times; return the ratios."""
    loops = bench_train.measure(args)  # sets the thread count
    seconds: dict[str, list[float]] = {m: [] for m in args.methods}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for m in args.methods:
                out = Path(tmp) / f"{m}-{r}"
                # bench_methods' own composition (no logger, no progress bar, UDIM's warm-up off)
                seconds[m] += bench_methods.time_method(bench_methods._cfg(args, m, out), out, args.warmup)
    return ratios(loops, seconds)


def table(changes: list[Change], tolerance: float) -> str:
    """The markdown table of ``changes`` with a flag on every regression."""
    lines = ["| ratio (higher is faster) | now | committed | change |", "|---|---|---|---|"]
    for c in changes:
        now = "-" if c.current is None else f"{c.current:.3f}"
        then = "-" if c.baseline is None else f"{c.baseline:.3f}"
        rel = "-" if c.relative is None else f"{100 * c.relative:+.1f} %"
        flag = f" **dropped > {100 * tolerance:.0f} %**" if c.regression else ""
        lines.append(f"| {c.name} | {now} | {then} | {rel}{flag} |")
    return "\n".join(lines)


def _config(args: argparse.Namespace) -> dict:
    keys = ("exp", "steps", "warmup", "repeats", "threads", "methods", "overrides")
    return {k: getattr(args, k) for k in keys}


def same_setting(a: Mapping, b: Mapping) -> bool:
    """Whether two configs measure the same thing (``repeats`` and ``methods`` only change noise and coverage)."""
    return all(a.get(k) == b.get(k) for k in ("exp", "steps", "warmup", "threads", "overrides"))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", default="quickstart")
    p.add_argument("--methods", nargs="+", default=METHODS, help=f"default: {' '.join(METHODS)} (ERM always)")
    p.add_argument("--steps", type=int, default=12, help="steps of every loop and fit")
    p.add_argument("--warmup", type=int, default=4, help="steps of each left out of the timing")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tolerance", type=float, default=0.15, help="relative drop reported (default: 0.15)")
    p.add_argument("--baseline", type=Path, default=BASELINE, help="committed figures (default: %(default)s)")
    p.add_argument("--save", action="store_true", help="write these figures to --baseline")
    p.add_argument("--strict", action="store_true", help="exit 1 when a ratio dropped")
    p.epilog = f"Hydra overrides (key=value) may follow anywhere, or after --; default: {' '.join(SIZES)}."
    return p


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table against the baseline, optionally save; the exit status (1: a drop, --strict)."""
    p = _parser()
    args, overrides = parse_with_overrides(p, argv)
    args.overrides = overrides or SIZES
    if args.steps < args.warmup + 2:
        p.error(f"--steps={args.steps} must be at least --warmup + 2 = {args.warmup + 2}")
    args.methods = list(dict.fromkeys(["erm", *args.methods]))  # ERM is the reference
    current = measure(args)
    saved = json.loads(args.baseline.read_text()) if args.baseline.exists() else {}
    changes = compare(current, saved.get("ratios", {}), args.tolerance)
    print(f"\nmachine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads={args.threads}")
    print(f"config: {json.dumps(_config(args))}")
    if saved and not same_setting(saved.get("config", {}), _config(args)):
        print(f"note: the baseline was measured with another config, {json.dumps(saved.get('config'))}")
    print(f"baseline: {args.baseline if saved else 'none'}\n")
    print(table(changes, args.tolerance))
    dropped = [c.name for c in changes if c.regression]
    if dropped:
        print(f"\nthroughput regression: {', '.join(dropped)} dropped more than {100 * args.tolerance:.0f} %")
    if args.save:
        record = {"note": NOTE, "measured": datetime.date.today().isoformat(), "torch": torch.__version__}
        record.update(machine=platform.processor() or platform.machine(), config=_config(args))
        record["ratios"] = {k: round(v, 4) for k, v in current.items()}
        args.baseline.write_text(json.dumps(record, indent=2) + "\n")
        print(f"saved: {args.baseline}")
    return 1 if dropped and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
