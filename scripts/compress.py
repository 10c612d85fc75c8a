"""Compress a trained checkpoint post hoc and evaluate it on every domain (``conf/compress/``).

Usage::

    python scripts/compress.py ckpt=outputs/runs/<run>/checkpoints/best.ckpt compress=awq_w4
    python scripts/compress.py ckpt=... compress=prune_wanda compress.sparsity=0.7
    python scripts/compress.py ckpt=... compress=awq_w4 compress.calibration.allow_target=true   # analysis only

Calibration reads the source domains' training images only (unless ``allow_target``). Writes
``<run folder>/variants/<compress name>/``: ``model.ckpt`` (reloads through the transform chain), ``final.json``
(what changed, scores before and after) and the run-folder files that make it a row of ``collect_results``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dgkit.checkpoint import read_checkpoint  # noqa: E402
from dgkit.compress.runner import compress_checkpoint, compress_name, format_change  # noqa: E402
from dgkit.config import register_resolvers  # noqa: E402
from dgkit.errors import run_reporting_user_errors  # noqa: E402
from dgkit.utils.cli import quote_paths  # noqa: E402

register_resolvers()


@hydra.main(version_base=None, config_path="../conf", config_name="compress_checkpoint")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: bad input (a missing checkpoint, an unknown layer) ends in one message, exit status 2."""
    run_reporting_user_errors(compress, cfg)


def compress(cfg: DictConfig) -> None:
    """Compress ``cfg.ckpt`` with ``cfg.compress``; print the per-domain change and where it was written."""
    if OmegaConf.is_missing(cfg, "ckpt") or not cfg.ckpt:
        raise ValueError("ckpt= is required: a run's checkpoints/best.ckpt (python scripts/compress.py ckpt=PATH)")
    if not cfg.compress or not cfg.compress.get("_target_"):
        raise ValueError("compress= names no compression: choose one of conf/compress (awq_w4, int8, prune_wanda...)")
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    name = compress_name(cfg.compress)
    result = compress_checkpoint(
        cfg.ckpt, cfg.compress, name, out=cfg.out,
        data_paths={"data.root": cfg.data.root, "paths.datasets": cfg.paths.datasets},
    )  # fmt: skip
    meta = read_checkpoint(result["checkpoint"])["dgkit_meta"]
    print(format_change(result, meta["test_domains"], _metric(result)))
    print(f"wrote {result['folder']}\n  python scripts/export.py ckpt={result['checkpoint']} export=onnx")


def _metric(result: dict) -> str:
    """The metric key of the scores (``acc/<domain>/<split>`` → ``acc``)."""
    return next(iter(result["after"])).split("/")[0]


if __name__ == "__main__":
    sys.argv[1:] = quote_paths(sys.argv[1:])
    main()
