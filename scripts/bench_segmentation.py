"""MapSAM costs on CPU: seconds per training step and per image at inference, and trainable parameters per arm.

Every case is a ``method=mapsam`` model built through the composition root (``+exp=hist_maps_mapsam`` plus the
case's overrides; random weights, timing does not depend on them) and measured in one process, round-robin (A B C
... A B C ...) so machine load hits all alike; each call is timed alone and medians are reported, with ratios to
the first case. A training step is forward + backward + AdamW step on one random batch (data pipeline excluded);
inference is a no-grad forward in eval mode on a batch, divided by its size (the study's evaluation), and on one
image. ``sam_vit_b`` at 1024 px takes about a minute per image on one thread: it is measured once, on one image,
only with ``--vit-b-1024``.

    python scripts/bench_segmentation.py                      # sam_tiny arms at 128 px and sam_vit_b at 256 px
    python scripts/bench_segmentation.py --vit-b-1024         # + one sam_vit_b image at 1024 px
    python scripts/bench_segmentation.py --rounds 5 --threads 1
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

from dgkit.compose import build  # noqa: E402
from dgkit.config import register_resolvers  # noqa: E402

TINY = ["backbone=sam_tiny", "data.image_size=128"]
# (label, overrides, training batch, inference batch): the study's arms on sam_tiny, then DoRA-SAM on sam_vit_b.
CASES = [
    ("sam_tiny DoRA-SAM", [*TINY], 12, 64),
    ("sam_tiny full fine-tuning", [*TINY, "adapter=none"], 12, 64),
    ("sam_tiny decoder only", [*TINY, "adapter=freeze"], 12, 64),
    ("sam_tiny LoRA", [*TINY, "adapter=lora"], 12, 64),
    ("sam_tiny SoMA", [*TINY, "adapter=soma"], 12, 64),
    ("sam_tiny zero-shot (SPGen only)", [*TINY, "adapter=freeze", "method.variant=frozen_decoder"], 12, 64),
    ("sam_vit_b DoRA-SAM 256 px", ["backbone=sam_vit_b", "data.image_size=256"], 2, 2),
]
VIT_B_1024 = ("sam_vit_b DoRA-SAM 1024 px", ["backbone=sam_vit_b", "data.image_size=1024"])


def build_method(overrides: list[str]):
    """The MapSAM method of ``+exp=hist_maps_mapsam`` with ``overrides`` (random weights)."""
    register_resolvers()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["+exp=hist_maps_mapsam", "output_dir=/tmp/bench_seg", *overrides])
    _, method = build(cfg)
    return method


def trainable(method) -> tuple[int, int, int]:
    """``(encoder adapter/weights trainable, all trainable, all)`` parameter counts of a MapSAM method."""
    enc = sum(p.numel() for n, p in method.named_parameters() if p.requires_grad and ".image_encoder." in n)
    return (
        enc,
        sum(p.numel() for p in method.parameters() if p.requires_grad),
        sum(p.numel() for p in method.parameters()),
    )


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per case (round-robin)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vit-b-1024", action="store_true", help="also time one sam_vit_b image at 1024 px")
    parser.add_argument("--skip-vit-b", action="store_true", help="sam_tiny cases only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cases = [c for c in CASES if not (args.skip_vit_b and "vit_b" in c[0])]
    runs = []
    for label, overrides, train_batch, eval_batch in cases:
        method = build_method(overrides)
        side = method.backbone.img_size
        optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-4)
        x, y = torch.randn(train_batch, 3, side, side), (torch.rand(train_batch, side, side) > 0.7).long()
        x_eval = torch.randn(eval_batch, 3, side, side)

        def step(method=method, optimizer=optimizer, x=x, y=y):
            method.train()
            optimizer.zero_grad()
            method.training_losses({"a": (x, y)})["loss"].backward()
            optimizer.step()

        def infer(method=method, x=x_eval):
            method.eval()
            with torch.no_grad():
                method(x)

        def infer_one(method=method, x=x_eval[:1]):
            method.eval()
            with torch.no_grad():
                method(x)

        step(), infer_one()  # warm-up
        runs.append({"label": label, "fns": (step, infer, infer_one), "batches": (train_batch, eval_batch),
                     "params": trainable(method), "times": ([], [], [])})  # fmt: skip
    for _ in range(args.rounds):
        for run in runs:
            for fn, times in zip(run["fns"], run["times"]):
                times.append(_timed(fn))

    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), torch "
          f"{torch.__version__}, medians of {args.rounds} round-robin rounds, random weights")  # fmt: skip
    print("| case | s / training step (batch) | s / image, batched eval (batch) | s / image, one image | "
          "step vs first | eval vs first | encoder trainable | all trainable | all parameters |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    first = None
    for run in runs:
        step_s, eval_s, one_s = (statistics.median(t) for t in run["times"])
        per_step, per_image = step_s, eval_s / run["batches"][1]
        first = first or (per_step / run["batches"][0], per_image)
        enc, train_n, total = run["params"]
        print(f"| {run['label']} | {per_step:.3f} ({run['batches'][0]}) | {per_image:.4f} ({run['batches'][1]}) | "
              f"{one_s:.3f} | {per_step / run['batches'][0] / first[0]:.1f}x per image | {per_image / first[1]:.1f}x"
              f" | {enc:,} | {train_n:,} | {total:,} |")  # fmt: skip
    if args.vit_b_1024:
        label, overrides = VIT_B_1024
        method = build_method(overrides).eval()
        x = torch.randn(1, 3, 1024, 1024)
        with torch.no_grad():
            seconds = _timed(lambda: method(x))
        enc, train_n, total = trainable(method)
        print(
            f"| {label} | not measured | not measured | {seconds:.1f} (one call, no warm-up) | | "
            f"{seconds / first[1]:.0f}x | {enc:,} | {train_n:,} | {total:,} |"
        )


if __name__ == "__main__":
    main()
