"""ERM training speed: dgkit's ``train.py`` against DomainBed's own training loop, in separate processes.

Both sides train DomainBed's MNIST CNN (dgkit's ``small_cnn`` is the same layers) with Adam (lr 1e-3) on the same
tensors: the training ("in") split of dgkit's embedded rotated_digits for the first ``S`` rotations as sources,
28 px, 3 channels, no augmentation (``data.augment=none``), 64 images per source domain and step, one thread
(``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``), the data loaded in the main process (``num_workers=0`` on
both sides; DomainBed's own default for MNIST is 8 workers).

- **dgkit**: ``python train.py +exp=rotated_digits_erm backbone=small_cnn data.batch_size=64 data.augment=none
  threads=1 trainer.enable_progress_bar=false ...`` run as it is (Lightning, logger, checkpoint callbacks), with a
  callback that only records the clock and ``getrusage`` at the end of every training step.
- **DomainBed**: a thin driver (this file, ``--worker domainbed``) that imports DomainBed from ``--domainbed PATH``
  and runs its ``train.py`` loop: ``algorithms.ERM`` (``networks.MNIST_CNN`` + linear classifier, its Adam) with
  one ``lib.fast_data_loader.InfiniteDataLoader`` per source domain over a ``TensorDataset`` of those tensors,
  ``next(zip(*loaders))`` and ``algorithm.update`` per step. Nothing of DomainBed is copied here.

Neither side evaluates inside the timed window (dgkit evaluates once after its last step; the driver never).
Each run is its own process; the arms alternate (A B A B ...) ``--repeats`` times. Reported per arm, medians over
repeats, over the steps after ``--warmup``: steps/s (wall clock), user and system CPU seconds per step and minor page
faults per step (the child's own ``getrusage``), and the time from process launch to the end of the first step.

    python scripts/bench_domainbed.py --domainbed /path/to/DomainBed --sources 3,5 --steps 25 --repeats 3

Get DomainBed with ``git clone https://github.com/facebookresearch/DomainBed`` (this script never downloads it).
``--arms`` adds ``dgkit-malloc-default`` (dgkit with ``DGKIT_MALLOC=default``: glibc's allocator as it comes, i.e.
before dgkit's allocator set-up) and ``domainbed-malloc-tuned`` (DomainBed with the equivalent environment:
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...``). Hydra overrides (``key=value``) are passed to the dgkit side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dgkit.utils.cli import parse_with_overrides  # noqa: E402

DOMAINS = 6  # rotated_digits: 0, 15, ..., 75 degrees
ARMS = ("domainbed", "dgkit", "dgkit-malloc-default", "domainbed-malloc-tuned")
GET_DOMAINBED = "git clone https://github.com/facebookresearch/DomainBed"
TUNED_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 36)}


def _sources(text: str) -> list[int]:
    """``--sources 3,5`` as ``[3, 5]``; each between 1 and 5 (rotated_digits has 6 domains, one is held out)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sources {text!r}: give comma-separated integers, e.g. 3,5") from None
    if not values or any(not 1 <= v < DOMAINS for v in values):
        raise argparse.ArgumentTypeError(f"--sources {text!r}: each count must be 1 to {DOMAINS - 1}")
    return values


def _arms(text: str) -> list[str]:
    """``--arms`` as a list; each one of :data:`ARMS`."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in ARMS]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"--arms {text!r}: unknown {bad}; choose from {list(ARMS)}")
    return values


def parser() -> argparse.ArgumentParser:
    """The command line (Hydra overrides for the dgkit side are parsed apart)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domainbed", type=Path, help=f"a DomainBed checkout (get one: {GET_DOMAINBED})")
    p.add_argument("--sources", type=_sources, default=[3, 5], help="source-domain counts to compare (default 3,5)")
    p.add_argument("--steps", type=int, default=25, help="training steps of every run")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs of every arm")
    p.add_argument("--batch", type=int, default=64, help="images per source domain and step")
    p.add_argument("--arms", type=_arms, default=["domainbed", "dgkit"], help=f"processes to compare: {list(ARMS)}")
    p.add_argument("--worker", choices=("dgkit", "domainbed"), help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.epilog = "Hydra overrides (key=value) for the dgkit side may follow anywhere, or after --."
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Stop with a usage error for a missing or wrong ``--domainbed`` or inconsistent step counts."""
    if args.domainbed is None:
        p.error(f"--domainbed PATH is required: a DomainBed checkout (get one with `{GET_DOMAINBED}`)")
    if not (args.domainbed / "domainbed" / "algorithms.py").is_file():
        p.error(f"--domainbed {args.domainbed}: no domainbed/algorithms.py there; pass the checkout's root folder")
    if args.warmup < 1 or args.steps < args.warmup + 2:
        p.error(f"--steps={args.steps}, --warmup={args.warmup}: need --warmup >= 1 and --steps >= --warmup + 2")
    if args.repeats < 1 or args.batch < 1:
        p.error(f"--repeats={args.repeats}, --batch={args.batch}: both must be >= 1")


# ---------------------------------------------------------------- inside a worker process


def _sample() -> tuple[float, float, float, int]:
    """(wall clock, user CPU s, system CPU s, minor faults) of this process now."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.time(), r.ru_utime, r.ru_stime, r.ru_minflt


def _write(path: Path, samples: list[tuple[float, float, float, int]]) -> None:
    path.write_text(json.dumps({"samples": samples}))


def _worker_domainbed(args: argparse.Namespace) -> None:
    """DomainBed's ``train.py`` loop over the tensors in ``args.data``, ``args.steps`` steps, no evaluation."""
    import random  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    sys.path.insert(0, str(args.domainbed.resolve()))
    from domainbed import algorithms, hparams_registry  # noqa: PLC0415
    from domainbed.lib.fast_data_loader import InfiniteDataLoader  # noqa: PLC0415

    torch.set_num_threads(1)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)  # train.py seeds these with --seed
    data = torch.load(args.data)
    hparams = hparams_registry.default_hparams("ERM", "RotatedMNIST")  # lr 1e-3, weight decay 0, batch 64
    hparams["batch_size"] = args.batch
    envs = [torch.utils.data.TensorDataset(x, y) for x, y in zip(data["x"], data["y"])]
    loaders = [InfiniteDataLoader(dataset=e, weights=None, batch_size=args.batch, num_workers=0) for e in envs]
    algorithm = algorithms.get_algorithm_class("ERM")(tuple(data["x"][0].shape[1:]), 10, len(envs), hparams)
    device = "cpu"
    algorithm.to(device)
    minibatches = zip(*loaders)
    samples = []
    for _ in range(args.steps):
        batch = [(x.to(device), y.to(device)) for x, y in next(minibatches)]
        algorithm.update(batch, None)
        samples.append(_sample())
    _write(args.result, samples)


def _worker_dgkit(args: argparse.Namespace, overrides: list[str]) -> None:
    """``train.py`` itself (``runpy``) with a step clock added to the trainer's callbacks."""
    import runpy  # noqa: PLC0415

    import pytorch_lightning as pl  # noqa: PLC0415

    import dgkit.run  # noqa: PLC0415

    samples: list[tuple[float, float, float, int]] = []

    class StepClock(pl.Callback):
        def on_train_batch_end(self, *_args) -> None:
            samples.append(_sample())

    build_trainer = dgkit.run.build_trainer

    def with_clock(*a, **kw):
        trainer = build_trainer(*a, **kw)
        trainer.callbacks.append(StepClock())
        return trainer

    dgkit.run.build_trainer = with_clock
    sys.argv = [str(ROOT / "train.py"), *overrides]
    try:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    except SystemExit as err:
        if err.code:
            raise
    _write(args.result, samples[: args.steps])


# ---------------------------------------------------------------- the parent


def dgkit_overrides(sources: int, args: argparse.Namespace, out: Path, extra: list[str]) -> list[str]:
    """``train.py`` overrides: the first ``sources`` rotations as sources, the rest held out, evaluation only after
    the last step."""
    held_out = [str(15 * d) for d in range(sources, DOMAINS)]
    return [
        "+exp=rotated_digits_erm",
        "backbone=small_cnn",
        f"data.batch_size={args.batch}",
        "data.augment=none",
        f"data.test_domains=[{','.join(held_out)}]",
        "data.num_workers=0",
        f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={args.steps}",
        "trainer.enable_progress_bar=false",
        "threads=1",
        "print_summary=false",
        "resume=false",
        f"hydra.run.dir={out}",
        f"output_dir={out}",
        *extra,
    ]


def export_tensors(overrides: list[str], path: Path) -> tuple[int, list[int]]:
    """Write the source domains' training tensors dgkit trains on (its pipeline, no augmentation) to ``path``:
    ``{"x": [(N_d, C, H, W) float32], "y": [(N_d,) int64]}``. Returns (image side, images per domain)."""
    import torch  # noqa: PLC0415
    from hydra import compose, initialize_config_dir  # noqa: PLC0415

    from dgkit.compose import build_backbone, build_datamodule  # noqa: PLC0415
    from dgkit.config import register_resolvers  # noqa: PLC0415

    register_resolvers()
    keep = [o for o in overrides if not o.startswith("hydra.")]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=keep)
    dm = build_datamodule(cfg, build_backbone(cfg))
    xs, ys = [], []
    for d in dm.source_domains:
        split = dm.train_split(d)
        items = [split[i] for i in range(len(split))]
        xs.append(torch.stack([x for x, _ in items]).contiguous())
        ys.append(torch.as_tensor([int(y) for _, y in items], dtype=torch.int64))
    torch.save({"x": xs, "y": ys, "domains": dm.source_domains}, path)
    return int(xs[0].shape[-1]), [len(y) for y in ys]


def run_arm(arm: str, args: argparse.Namespace, sources: int, data: Path, tmp: Path, extra: list[str]) -> dict:
    """One process of ``arm``; its per-step samples reduced to rates, CPU and faults per step."""
    result = tmp / f"{arm}-{sources}-{time.monotonic_ns()}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    for key in (*TUNED_ENV, "DGKIT_MALLOC"):
        env.pop(key, None)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--steps", str(args.steps), "--batch", str(args.batch),
           "--result", str(result)]  # fmt: skip
    if arm.startswith("domainbed"):
        cmd += ["--worker", "domainbed", "--domainbed", str(args.domainbed), "--data", str(data)]
        if arm == "domainbed-malloc-tuned":
            env.update(TUNED_ENV)
    else:
        cmd += ["--worker", "dgkit", "--", *dgkit_overrides(sources, args, tmp / f"run-{result.stem}", extra)]
        if arm == "dgkit-malloc-default":
            env["DGKIT_MALLOC"] = "default"
    start = time.time()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{arm} ({sources} sources) failed:\n{proc.stderr[-3000:]}")
    return reduce(json.loads(result.read_text())["samples"], start, args.warmup)


def reduce(samples: list[list[float]], start: float, warmup: int) -> dict:
    """Steps/s, CPU and faults per step between the end of step ``warmup`` and the last step, and the time from
    ``start`` to the end of the first step."""
    if len(samples) < warmup + 2:
        raise ValueError(f"{len(samples)} steps recorded with {warmup} warm-up steps: need {warmup + 2}")
    (t0, u0, s0, f0), (t1, u1, s1, f1) = samples[warmup - 1], samples[-1]
    n = len(samples) - warmup
    return {"steps": len(samples), "rate": n / (t1 - t0), "user": (u1 - u0) / n, "sys": (s1 - s0) / n,
            "faults": (f1 - f0) / n, "first_step": samples[0][0] - start}  # fmt: skip


def measure(args: argparse.Namespace, extra: list[str]) -> dict[int, dict[str, list[dict]]]:
    """Every arm ``args.repeats`` times per source count, interleaved; the raw per-run figures."""
    results: dict[int, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_domainbed_") as name:
        tmp = Path(name)
        for sources in args.sources:
            data = tmp / f"rotated_digits_{sources}.pt"
            side, sizes = export_tensors(dgkit_overrides(sources, args, tmp / "export", extra), data)
            print(f"{sources} sources: {side} px, training images per domain {sizes}", flush=True)
            results[sources] = {arm: [] for arm in args.arms}
            for r in range(args.repeats):
                for arm in args.arms:
                    res = run_arm(arm, args, sources, data, tmp, extra)
                    results[sources][arm].append(res)
                    print(f"  repeat {r} {arm}: {res['rate']:.3f} steps/s, user {res['user']:.3f} s, sys "
                          f"{res['sys']:.3f} s, {res['faults']:.0f} faults/step, first step at "
                          f"{res['first_step']:.1f} s", flush=True)  # fmt: skip
    return results


def table(results: dict[int, dict[str, list[dict]]], arms: list[str]) -> str:
    """Markdown table of medians per source count and arm; speeds relative to the first arm (wall clock, and
    steps per CPU second: user + system)."""
    lines = ["| sources × 64 | process | steps/s vs first | steps per CPU-s vs first | user CPU s/step "
             "| sys CPU s/step | minor faults/step | time to first step (s) |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for sources, by_arm in results.items():
        med = {arm: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for arm, runs in by_arm.items()}
        ref = med[arms[0]]
        for arm in arms:
            m = med[arm]
            cpu = (ref["user"] + ref["sys"]) / (m["user"] + m["sys"])
            lines.append(f"| {sources} | {arm} | {m['rate'] / ref['rate']:.3f} | {cpu:.3f} | {m['user']:.3f} | "
                         f"{m['sys']:.3f} | {m['faults']:,.0f} | {m['first_step']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def domainbed_commit(path: Path) -> str:
    """The checkout's commit (``git rev-parse HEAD``), or ``unknown`` for an exported tree."""
    proc = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown (not a git checkout)"


def main(argv: list[str] | None = None) -> dict[int, dict[str, list[dict]]] | None:
    """Run the comparison and print the table (or, with ``--worker``, be one timed process)."""
    p = parser()
    args, extra = parse_with_overrides(p, argv)
    if args.worker == "dgkit":
        return _worker_dgkit(args, extra)
    if args.worker == "domainbed":
        return _worker_domainbed(args)
    check_args(p, args)
    results = measure(args, extra)
    import torch  # noqa: PLC0415

    print(f"\nmachine: {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, one thread; "
          f"DomainBed {domainbed_commit(args.domainbed)}")  # fmt: skip
    print(f"{args.steps} steps per run, {args.warmup} warm-up, {args.repeats} interleaved repeats, medians\n")
    print(table(results, args.arms))
    return results


if __name__ == "__main__":
    main()
