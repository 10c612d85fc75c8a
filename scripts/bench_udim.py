"""UDIM's step cost against SAM's and ERM's: a ``torch.profiler`` table of where the time goes, and interleaved
step-time ratios, before and after the optimisation of ``dgkit/methods/udim.py``.

Variants, each a real Lightning fit composed as ``+exp=<exp> method=<...>`` by dgkit's composition root (the
same backbone, data, batch and thread count; UDIM with ``warmup_steps=0`` so that its own step is timed):

- ``erm``, ``sam`` (``method=sharpness``);
- ``udim_before``: the exact UDIM step as it was at ``--before`` (git; default: the last commit before the
  optimisation), loaded from ``git show`` into a temporary module;
- ``udim_exact``: today's exact step (``input_gradient=exact``: same maths, less recomputation);
- ``udim_fd``: ``input_gradient=finite_difference`` (``fd_step=null``: the cheaper variant, another ascent
  direction).

Timing: the variants alternate (``--repeats`` rounds of one fit each), every training step is timed from
``on_train_batch_start`` to ``on_train_batch_end`` (``scripts/bench_methods.py``'s span) on two clocks, the
main thread's CPU time (steady under load with one thread) and the wall clock; the first ``--warmup`` steps
of each fit are dropped, and the medians give the ratios. Profile: one more fit per variant,
``torch.profiler`` (CPU) over ``--profile-steps`` steps after the warm-up; the tables give milliseconds per
step: the aten operators with the most self time, and UDIM's phases (``record_function`` labels in udim.py).

    python scripts/bench_udim.py                                  # +exp=digits_erm: small_cnn_lite, 3 x 32 images
    python scripts/bench_udim.py --repeats 1 --steps 5 --warmup 2 --profile-steps 1 data=synthetic   # smoke run
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import open_dict
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_methods  # noqa: E402

from dgkit.compose import build, build_trainer  # noqa: E402
from dgkit.methods.udim import perturb_instances  # noqa: E402
from dgkit.utils.cli import parse_with_overrides  # noqa: E402

BEFORE = "45ac19878b78ad2b260a28c26358127e205feecc"  # the last commit of udim.py before the optimisation
BEFORE_MODULE = "_udim_before"
NEW_KEYS = ("input_gradient", "fd_step")  # keys the code at --before does not know
VARIANTS: dict[str, list[str]] = {
    "erm": ["method=erm"],
    "sam": ["method=sharpness"],
    "udim_before": ["method=udim", f"method._target_={BEFORE_MODULE}.UDIM"],  # NEW_KEYS dropped in _cfg
    "udim_exact": ["method=udim", "method.input_gradient=exact"],
    "udim_fd": ["method=udim", "method.input_gradient=finite_difference"],
}
UDIMS = ("udim_before", "udim_exact", "udim_fd")
CLOCKS = ("wall", "cpu")  # the order time_variant returns them in


def load_before(rev: str, folder: Path) -> None:
    """Write ``dgkit/methods/udim.py`` at git revision ``rev`` to ``folder/_udim_before.py`` and import it."""
    source = subprocess.run(
        ["git", "show", f"{rev}:dgkit/methods/udim.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    (folder / f"{BEFORE_MODULE}.py").write_text(source)
    sys.path.insert(0, str(folder))
    importlib.import_module(BEFORE_MODULE)


def _cfg(args: argparse.Namespace, variant: str, out: Path):
    """bench_methods' composition (no evaluation, logger or progress bar; UDIM's warm-up off) of ``variant``."""
    method, *extra = VARIANTS[variant]
    ns = argparse.Namespace(exp=args.exp, steps=args.steps, overrides=[*extra, *args.overrides])
    cfg = bench_methods._cfg(ns, method.removeprefix("method="), out)
    if variant == "udim_before":
        with open_dict(cfg):
            for key in NEW_KEYS:
                cfg.method.pop(key, None)
    return cfg


class _StepClocks(pl.Callback):
    """Wall-clock and CPU seconds (this thread's: ``time.thread_time``) of every training step, batch start to
    batch end (``scripts/bench_methods.py``'s span). With one thread, CPU time leaves out the time the scheduler
    gives other processes, so it is the steadier of the two on a loaded machine."""

    def __init__(self) -> None:
        self.start = (0.0, 0.0)
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        """Start both clocks."""
        self.start = (time.perf_counter(), time.thread_time())

    def on_train_batch_end(self, *args) -> None:
        """Record the step."""
        self.wall.append(time.perf_counter() - self.start[0])
        self.cpu.append(time.thread_time() - self.start[1])


def time_variant(args: argparse.Namespace, variant: str, out: Path) -> tuple[list[float], list[float]]:
    """``(wall, cpu)`` seconds per step of one Lightning fit of ``variant``, the first ``--warmup`` steps dropped."""
    cfg = _cfg(args, variant, out)
    pl.seed_everything(0, verbose=False)
    datamodule, method = build(cfg)
    trainer = build_trainer(cfg, out, {}, method)
    clocks = _StepClocks()
    trainer.callbacks.append(clocks)
    trainer.fit(method, datamodule=datamodule)
    return clocks.wall[args.warmup :], clocks.cpu[args.warmup :]


class _Profiled(pl.Callback):
    """Profile the training steps ``start`` to ``start + steps - 1`` (batch indices) with ``torch.profiler``."""

    def __init__(self, start: int, steps: int) -> None:
        self.start, self.steps = start, steps
        self.prof: profile | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        """Start the profiler at the first profiled step."""
        if batch_idx == self.start:
            self.prof = profile(activities=[ProfilerActivity.CPU])
            self.prof.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        """Stop it after the last one."""
        if batch_idx == self.start + self.steps - 1 and self.prof is not None:
            self.prof.__exit__(None, None, None)


def profile_variant(args: argparse.Namespace, variant: str, out: Path) -> tuple[dict[str, float], dict[str, float]]:
    """``(self CPU ms per step by operator, total CPU ms per step by record_function label)`` of one fit."""
    cfg = _cfg(args, variant, out)
    cfg.trainer.max_steps = args.warmup + args.profile_steps
    pl.seed_everything(0, verbose=False)
    datamodule, method = build(cfg)
    trainer = build_trainer(cfg, out, {}, method)
    profiled = _Profiled(args.warmup, args.profile_steps)
    trainer.callbacks.append(profiled)
    trainer.fit(method, datamodule=datamodule)
    ops: dict[str, float] = {}
    phases: dict[str, float] = {}
    for event in profiled.prof.key_averages():
        if event.key.startswith("udim/"):
            phases[event.key] = event.cpu_time_total / 1e3 / args.profile_steps
        elif event.key.startswith("aten::"):
            ops[event.key] = event.self_cpu_time_total / 1e3 / args.profile_steps
    return ops, phases


class _Directions(pl.Callback):
    """At every training step: the cosine between the exact ``∇_x Φ`` and ``∇_x ℓ(θ + ε)`` (finite_difference,
    ``fd_step=null``), and between the perturbations ``x̃ - x`` they give (after ``perturb_norm``)."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, float, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        """Both directions on this step's batch at the current parameters (before the step)."""
        x, y = pl_module.concat(batch)
        exact = pl_module.instance_gradient(x, y)[2]
        _, grads, _, _ = pl_module.source_gradient(x, y)
        fd = pl_module.input_gradient_at(x, y, grads, pl_module.rho)
        move = [perturb_instances(x, d, pl_module.rho_x, pl_module.perturb_norm) - x for d in (exact, fd)]
        cos = torch.nn.functional.cosine_similarity
        self.rows.append(
            (
                batch_idx,
                float(cos(exact.flatten(), fd.flatten(), dim=0)),
                float(cos(*(m.flatten() for m in move), dim=0)),
            )
        )


def direction_cosines(args: argparse.Namespace, out: Path) -> list[tuple[int, float, float]]:
    """:class:`_Directions` over a ``udim_exact`` fit of ``--direction-steps`` steps from initialisation."""
    cfg = _cfg(args, "udim_exact", out)
    cfg.trainer.max_steps = args.direction_steps
    pl.seed_everything(0, verbose=False)
    datamodule, method = build(cfg)
    trainer = build_trainer(cfg, out, {}, method)
    directions = _Directions()
    trainer.callbacks.append(directions)
    trainer.fit(method, datamodule=datamodule)
    return directions.rows


def op_table(ops: dict[str, dict[str, float]], rows: int) -> str:
    """Markdown: the ``rows`` operators with the most self time in the first UDIM variant, the rest, the total."""
    ref = ops[next((u for u in UDIMS if u in ops), list(ops)[-1])]
    order = sorted(ref, key=ref.get, reverse=True)[:rows]
    names = list(ops)
    lines = ["| aten operator (self CPU, ms per step) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for op in order:
        lines.append(f"| `{op}` | " + " | ".join(f"{ops[n].get(op, 0.0):.0f}" for n in names) + " |")
    rest = [sum(v for k, v in ops[n].items() if k not in order) for n in names]
    lines.append("| other aten operators | " + " | ".join(f"{r:.0f}" for r in rest) + " |")
    lines.append("| **all aten operators** | " + " | ".join(f"**{sum(ops[n].values()):.0f}**" for n in names) + " |")
    return "\n".join(lines)


def phase_table(phases: dict[str, dict[str, float]]) -> str:
    """Markdown: UDIM's phases (CPU time including children, ms per step) for the variants that label them."""
    names = [n for n in phases if phases[n]]
    labels = sorted({k for n in names for k in phases[n]})
    lines = ["| UDIM phase (CPU total, ms per step) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label in labels:
        cells = [f"{phases[n][label]:.0f}" if label in phases[n] else "-" for n in names]
        lines.append(f"| `{label}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Time the variants interleaved, profile each once, print the tables and the ratios."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", default="digits_erm")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=12, help="training steps per timed fit")
    p.add_argument("--warmup", type=int, default=3, help="steps of each fit left out of the timing and profile")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds of timed fits")
    p.add_argument("--profile-steps", type=int, default=3, help="profiled steps per variant (0: no profile)")
    p.add_argument("--rows", type=int, default=12, help="operators in the profile table")
    p.add_argument("--direction-steps", type=int, default=0, help="steps of the direction-cosine fit (0: none)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--before", default=BEFORE, help="git revision of the 'before' udim.py (default: %(default)s)")
    p.epilog = "Hydra overrides (key=value, applied to every variant) may follow anywhere, or after --."
    args, args.overrides = parse_with_overrides(p, argv)
    if args.steps <= args.warmup:
        p.error(f"--steps={args.steps} must exceed --warmup={args.warmup}")
    variants = list(dict.fromkeys(["erm", "sam", *args.variants]))  # the references
    torch.set_num_threads(args.threads)
    seconds = {clock: defaultdict(list) for clock in CLOCKS}
    per_round = {clock: defaultdict(list) for clock in CLOCKS}
    with tempfile.TemporaryDirectory() as tmp:
        load_before(args.before, Path(tmp))
        for r in range(args.repeats):
            for v in variants:
                for clock, times in zip(CLOCKS, time_variant(args, v, Path(tmp) / f"{v}-{r}")):
                    seconds[clock][v] += times
                    per_round[clock][v].append(statistics.median(times))
                print(
                    f"round {r} {v}: " + ", ".join(f"{c} {per_round[c][v][-1]:.4f} s/step" for c in CLOCKS), flush=True
                )
        ops, phases = {}, {}
        if args.profile_steps > 0:
            for v in variants:
                ops[v], phases[v] = profile_variant(args, v, Path(tmp) / f"{v}-profile")
        cosines = direction_cosines(args, Path(tmp) / "directions") if args.direction_steps > 0 else []
    cpu = platform.processor() or platform.machine()
    print(f"\nmachine: {cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}, "
          f"Python {platform.python_version()}, torch {torch.__version__}, threads={args.threads}, "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"config: +exp={args.exp} {' '.join(args.overrides)} ({args.steps} steps per fit, {args.warmup} warm-up, "
          f"{args.repeats} interleaved rounds; UDIM warmup_steps=0; before = {args.before[:10]})")  # fmt: skip
    header = (
        "| variant | s/step (median) | ratio to ERM | ratio to SAM | per-round ratio to SAM |\n|---|---|---|---|---|"
    )
    for clock in CLOCKS:
        median = {v: statistics.median(s) for v, s in seconds[clock].items()}
        print(f"\n{clock} time per step (median over all timed steps; per-round ratio: min-max over rounds)\n")
        print(header)
        for v in variants:
            rounds = [a / b for a, b in zip(per_round[clock][v], per_round[clock]["sam"])]
            erm, sam = median[v] / median["erm"], median[v] / median["sam"]
            print(f"| {v} | {median[v]:.4f} | {erm:.2f} | {sam:.2f} | {min(rounds):.2f}-{max(rounds):.2f} |")
    if ops:
        print(f"\nProfile ({args.profile_steps} steps per variant after {args.warmup} warm-up steps):\n")
        print(op_table(ops, args.rows))
        print()
        print(phase_table(phases))
    if cosines:
        print("\n| step (from init) | cos(exact ∇_x Φ, ∇_x ℓ(θ + ε)) | cos of the perturbations x̃ - x |\n|---|---|---|")
        for step, grad_cos, move_cos in cosines:
            print(f"| {step} | {grad_cos:.3f} | {move_cos:.3f} |")


if __name__ == "__main__":
    main()
