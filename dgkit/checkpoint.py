"""Rebuild a trained run from its checkpoint: the resolved config stored in it (``ConfigInCheckpoint``) is
instantiated by the composition root, then the weights are loaded. Modules are never unpickled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from dgkit.callbacks import CONFIG_KEY


def load_checkpoint(
    path: str | Path, overrides: dict[str, Any] | None = None
) -> tuple[DictConfig, pl.LightningDataModule, pl.LightningModule]:
    """``(config, datamodule, method)`` rebuilt from a dgkit checkpoint, weights loaded, method in eval mode.

    Pretrained-weight sources (``backbone.weights``, ``backbone.pretrained``) are switched off: the checkpoint
    holds every weight. ``overrides`` (dotted keys) change the stored config, e.g. ``{"data.root": ...}``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a checkpoint written by dgkit's ``train.py`` (no stored config).
    """
    from dgkit.run import build  # the composition root (imported late: it imports this package's users)

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (expected a run's checkpoints/best.ckpt)")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)  # our own files: config dict + tensors
    if CONFIG_KEY not in ckpt:
        raise ValueError(f"{path} has no '{CONFIG_KEY}': not a checkpoint written by dgkit's train.py")
    cfg = OmegaConf.create(ckpt[CONFIG_KEY])
    if "backbone" in cfg:
        for key, value in (("weights", None), ("pretrained", False)):
            if key in cfg.backbone:
                cfg.backbone[key] = value
    for key, value in (overrides or {}).items():
        OmegaConf.update(cfg, key, value, force_add=True)
    datamodule, method = build(cfg)
    method.load_state_dict(ckpt["state_dict"])
    return cfg, datamodule, method.eval()
