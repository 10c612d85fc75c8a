"""Export latency and size against eager PyTorch: the checkpoint's ``to_inference()`` and each export folder's
runtime, timed round-robin in one process (batch 1 and batch 32, median of ``--runs`` after warm-up, one thread).

    python scripts/bench_export.py --ckpt outputs/runs/<run>/checkpoints/best.ckpt \\
        --exports outputs/runs/<run>/exports/onnx outputs/runs/<run>/exports/onnx-awq_w4 --out bench.json

Prints, per model, its size on disk (the checkpoint file for eager, the model file for an export), the median
wall and process-CPU milliseconds per batch and the ratio of each to eager's; ``--out`` writes the same as JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dgkit.checkpoint import load_checkpoint  # noqa: E402
from dgkit.export.bench import cpu_model, example_batch, interleaved_ms, torch_threads  # noqa: E402
from dgkit.export.runtime import load_export  # noqa: E402
from dgkit.utils.io import atomic_write_json  # noqa: E402


def measure(ckpt: Path, exports: list[Path], batches: list[int], runs: int, warmup: int, threads: int) -> dict:
    """``{"models": {name: {"bytes", "batch_<n>": {wall_ms, cpu_ms, wall_ratio, cpu_ratio}}}, ...}``."""
    _, method = load_checkpoint(ckpt)
    eager = method.to_inference()
    models = {"eager": eager} | {str(f): load_export(f, threads=threads) for f in exports}
    sizes = {"eager": ckpt.stat().st_size} | {
        str(f): (f / models[str(f)].manifest["model"]["file"]).stat().st_size for f in exports
    }
    shape = (3, *method.meta["data_config"]["input_size"])
    result = {name: {"bytes": size} for name, size in sizes.items()}
    with torch_threads(threads), torch.no_grad():
        for b in batches:
            times = interleaved_ms(models, example_batch(shape, b), runs, warmup)
            for name, t in times.items():
                ratios = {f"{k.removesuffix('_ms')}_ratio": v / times["eager"][k] for k, v in t.items()}
                result[name][f"batch_{b}"] = {**t, **ratios}
    return {"models": result, "threads": threads, "runs": runs, "warmup": warmup, "cpu": cpu_model(),
            "checkpoint": str(ckpt)}  # fmt: skip


def main() -> None:
    """Parse the flags, measure, print the table, write ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="the checkpoint (eager reference)")
    parser.add_argument("--exports", type=Path, nargs="+", default=[], help="export folders (scripts/export.py)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--runs", type=int, default=20, help="timed calls per model and batch (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args()
    result = measure(args.ckpt, args.exports, args.batches, args.runs, args.warmup, args.threads)
    print(f"{args.threads} thread(s), median of {args.runs}, {result['cpu']}")
    for name, row in result["models"].items():
        cells = [f"b{b}: {row[f'batch_{b}']['cpu_ms']:8.2f} ms cpu ({row[f'batch_{b}']['cpu_ratio']:.2f}x), "
                 f"{row[f'batch_{b}']['wall_ms']:8.2f} ms wall" for b in args.batches]  # fmt: skip
        print(f"{name:<60} {row['bytes'] / 2**20:7.2f} MB  " + "  ".join(cells))
    if args.out:
        print(f"wrote {atomic_write_json(args.out, result)}")


if __name__ == "__main__":
    main()
