"""Evaluate a trained checkpoint with a test-time adaptation (``conf/tta/``), per test domain.

Usage::

    python scripts/evaluate.py ckpt=outputs/runs/<run>/checkpoints/best.ckpt tta=adanpc
    python scripts/evaluate.py ckpt=... tta=tent tta.reset=per_batch tta.batch_size=32 corrupt=digits_c
    python scripts/evaluate.py ckpt=... tta=t3a 'domains=[ink,photo,font]' split=out   # on source validation
    python scripts/evaluate.py ckpt=... tta=tent data.root=/new/place/PACS   # the benchmark moved since training

    python scripts/evaluate.py ckpt=outputs/runs/<run>/exports/onnx-awq_w4   # an export folder, every domain

With an export folder (``scripts/export.py``), the artifact runs in its runtime on every domain's in/out split
and is written as ``<run>/variants/<export name>/``: a row of ``collect_results``' tables (ERM+ORT-AWQ-W4).

Prints accuracy with and without the TTA and the time per image of each, and writes them (atomically) to
``<run folder>/tta/<tta>_bs<batch size>.json`` unless ``out=`` says otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dgkit.config import register_resolvers  # noqa: E402
from dgkit.errors import run_reporting_user_errors  # noqa: E402
from dgkit.export.evaluate import evaluate_export  # noqa: E402
from dgkit.export.manifest import MANIFEST  # noqa: E402
from dgkit.search import without_search  # noqa: E402
from dgkit.tta.runner import format_result, run_tta  # noqa: E402
from dgkit.utils.allocator import tune_allocator  # noqa: E402
from dgkit.utils.cli import quote_paths  # noqa: E402
from dgkit.variants import format_variant  # noqa: E402

register_resolvers()


@hydra.main(version_base=None, config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: bad input (a missing checkpoint, moved data) ends in one message, exit status 2."""
    run_reporting_user_errors(evaluate, cfg)


def evaluate(cfg: DictConfig) -> None:
    """Rebuild the run from the checkpoint, evaluate with and without the TTA, write the result file."""
    if OmegaConf.is_missing(cfg, "ckpt") or not cfg.ckpt:
        raise ValueError("ckpt= is required: a run's checkpoints/best.ckpt (python scripts/evaluate.py ckpt=PATH)")
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    data_paths = {"data.root": cfg.data.root, "paths.datasets": cfg.paths.datasets}
    if (Path(cfg.ckpt) / MANIFEST).exists():  # an export folder: every domain, as a row of the run's tables
        if cfg.tta.get("_target_", "").split(".")[-1] != "NoAdaptation":
            raise ValueError("test-time adaptation needs a checkpoint (it updates the model); an export is evaluated "
                             "as it is: drop tta=")  # fmt: skip
        folder = evaluate_export(cfg.ckpt, data_paths, threads=int(cfg.threads or 1))
        print(format_variant(folder))
        return
    tta = instantiate(without_search(cfg.tta))  # a conf/tta search block is not an argument
    out = Path(cfg.out) if cfg.out else None
    result, path = run_tta(
        cfg.ckpt, tta, without_search(cfg.tta), domains=cfg.domains, split=cfg.split, seed=int(cfg.seed),
        corrupt=OmegaConf.to_container(cfg.corrupt), out=out,
        data_paths=data_paths,
    )  # fmt: skip
    print(format_result(result))
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.argv[1:] = quote_paths(sys.argv[1:])
    tune_allocator()  # glibc: reuse freed buffers across batches (DGKIT_MALLOC=default: off)
    main()
