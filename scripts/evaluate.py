"""Evaluate a trained checkpoint with a test-time adaptation (``conf/tta/``), per held-out domain.

Usage::

    python scripts/evaluate.py ckpt=outputs/runs/<run>/checkpoints/best.ckpt tta=adanpc
    python scripts/evaluate.py ckpt=... tta=tent tta.reset=per_batch tta.batch_size=32 'domains=[photo,street]'

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

from dgkit.tta import evaluate_tta, load_checkpoint  # noqa: E402
from dgkit.utils.io import atomic_write_json  # noqa: E402


def report(result: dict) -> str:
    """A plain-text table of one evaluation."""
    lines = [f"tta={result['tta']} batch_size={result['batch_size']} reset={result['reset']}",
             f"{'domain':<20}{'none %':>9}{'tta %':>9}{'ms/img none':>13}{'ms/img tta':>12}"]  # fmt: skip
    for name, d in result["domains"].items():
        lines.append(
            f"{name:<20}{100 * d['acc_none']:9.1f}{100 * d['acc_tta']:9.1f}"
            f"{d['ms_per_image_none']:13.3f}{d['ms_per_image_tta']:12.3f}"
        )
    return "\n".join(lines)


@hydra.main(version_base=None, config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """Rebuild the run from the checkpoint, evaluate with and without the TTA, write the result file."""
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    overrides = {"data.root": cfg.data_root} if cfg.data_root else None
    run_cfg, datamodule, method = load_checkpoint(cfg.ckpt, overrides)
    tta = instantiate(cfg.tta)
    result = evaluate_tta(method, datamodule, tta, cfg.domains, seed=int(cfg.seed))
    result.update(ckpt=str(Path(cfg.ckpt).resolve()), tta_config=OmegaConf.to_container(cfg.tta))
    print(report(result))
    default = Path(cfg.ckpt).resolve().parents[1] / "tta" / f"{tta.name}_bs{tta.batch_size}.json"
    out = Path(cfg.out) if cfg.out else default
    atomic_write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
