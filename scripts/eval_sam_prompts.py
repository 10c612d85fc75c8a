"""Box-prompted mIoU of a promptable SAM (``method=sam_pretrain``'s metric) against a random-init one.

    python scripts/eval_sam_prompts.py --weights outputs/pretrained/sam_tiny/backbone.safetensors
    python scripts/eval_sam_prompts.py --weights PATH --data hist_maps     # zero-shot on hist_maps' areal features

Every visible object is prompted with its exact bounding box (SAM's single-mask output, logit > 0), and the IoU
of each mask with its object is averaged per set. ``--data sam_corpus``: the held-out photo family's ``in`` split
and every source family's ``out`` split (the split ``+exp=sam_tiny_pretrain`` validates on; the same seeded
in/out split as training). ``--data hist_maps``: every tile of each style, with each connected component of the
areal class (buildings, vineyards, water; 4-connectivity, at least ``--min-area`` pixels) as an object. Scores
go through ``method=sam_pretrain``'s own evaluation path (``SAMPretrain.prompted_masks``) and
``task=promptable``'s metric. One thread; prints a table (and writes ``--out`` JSON when given).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dgkit.backbones import SAMBackbone  # noqa: E402
from dgkit.data.benchmark import split_indices  # noqa: E402
from dgkit.data.embedded import hist_maps, sam_corpus  # noqa: E402
from dgkit.data.transforms import build_transform  # noqa: E402
from dgkit.methods.sam_pretrain import SAMPretrain  # noqa: E402
from dgkit.tasks.promptable import PromptableSegmentation  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def build_sam(weights: str | None, img_size: int, seed: int) -> SAMBackbone:
    """``backbone=sam_tiny backbone.prompt_decoder=true`` at ``img_size`` (random init drawn with ``seed``)."""
    cfg = OmegaConf.load(ROOT / "conf" / "backbone" / "sam_tiny.yaml")
    cfg.img_size, cfg.prompt_decoder, cfg.weights = img_size, True, weights
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg).items() if k != "_target_"}
    torch.manual_seed(seed)
    return SAMBackbone(**kwargs).eval()


def areal_instances(masks: np.ndarray, min_area: int) -> np.ndarray:
    """hist_maps three-class masks ``(N, H, W)`` to instance maps of the areal class's connected components."""
    out = np.zeros(masks.shape, np.int32)
    for i, m in enumerate(masks):
        labels, n = ndimage.label(m == hist_maps.AREAL)
        sizes = ndimage.sum(np.ones_like(labels), labels, index=np.arange(1, n + 1))
        keep = np.flatnonzero(sizes >= min_area) + 1
        lut = np.zeros(n + 1, np.int32)
        lut[keep] = np.arange(1, len(keep) + 1)
        out[i] = lut[labels]
    return out


def sets(data: str, root: str, min_area: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{set name: (images uint8 (N, H, W, 3), instance maps (N, H, W))}``."""
    if data == "sam_corpus":
        arrays, test = sam_corpus.load(root), "science"  # conf/data/sam_corpus.yaml's held-out family
        out = {}
        for d, (x, m) in arrays.items():
            split_in, split_out = split_indices(len(x), 0, d, 0.2)  # data.split_seed 0, holdout_fraction 0.2
            idx, name = (split_in, f"{d}/in (held out)") if d == test else (split_out, f"{d}/out")
            out[name] = (x[idx], m[idx].astype(np.int32))
        return out
    return {d: (x, areal_instances(m, min_area)) for d, (x, m) in hist_maps.load(root).items()}


@torch.no_grad()
def box_miou(sam: SAMBackbone, images: np.ndarray, instances: np.ndarray, batch: int = 64) -> tuple[float, int]:
    """Mean IoU of the box-prompted masks of every object (and the number of objects)."""
    task = PromptableSegmentation()
    method = SAMPretrain(sam, len(sam_corpus.CLASSES), ["all"], [], task=task, eval_objects=10_000).eval()
    metric = task.build_metric(0)
    transform = build_transform(sam.data_config, "none")
    for start in range(0, len(images), batch):
        x = torch.stack([transform(image=im)["image"] for im in images[start : start + batch]])
        y = torch.from_numpy(instances[start : start + batch]).long()
        logits, targets = method.prompted_masks(x, y)
        if len(logits):
            task.update_metric(metric, logits, targets)
    return float(metric.compute()), int(metric.count)


def main(argv: list[str] | None = None) -> None:
    """Score the given weights and a random init on every set of ``--data``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="backbone.safetensors of a sam_tiny pre-training run")
    parser.add_argument("--data", choices=["sam_corpus", "hist_maps"], default="sam_corpus")
    parser.add_argument("--root", default="datasets")
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-init model")
    parser.add_argument("--min-area", type=int, default=8, help="hist_maps: smallest areal component prompted (px)")
    parser.add_argument("--out", default=None, help="write the scores as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    models = {"pretrained": build_sam(args.weights, args.img_size, args.seed),
              "random init": build_sam(None, args.img_size, args.seed)}  # fmt: skip
    scores: dict[str, dict[str, float]] = {}
    print(f"box-prompted mIoU on {args.data} ({args.img_size} px)")
    print(f"{'set':<24} {'objects':>7} " + " ".join(f"{m:>12}" for m in models))
    for name, (x, y) in sets(args.data, args.root, args.min_area).items():
        row = {m: box_miou(model, x, y) for m, model in models.items()}
        scores[name] = {m: s for m, (s, _) in row.items()}
        count = next(iter(row.values()))[1]
        print(f"{name:<24} {count:>7} " + " ".join(f"{s:>12.3f}" for s, _ in row.values()))
    if args.out:
        Path(args.out).write_text(json.dumps({"data": args.data, "weights": args.weights, "scores": scores}, indent=1))


if __name__ == "__main__":
    main()
