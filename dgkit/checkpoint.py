"""Rebuild a trained model from its checkpoint, without its dataset and without unpickling anything.

A dgkit checkpoint holds the resolved config (``dgkit_config``), the run's metadata (``dgkit_meta``: task,
class and domain names, held-out domains, preprocessing, transform-chain records) and the weights. It is read
with ``torch.load(weights_only=True)``: plain containers and tensors only, so a checkpoint from elsewhere cannot
run code. :func:`load_checkpoint` rebuilds the model with :func:`dgkit.compose.build_model`, replaying the
chain, then loads the weights strictly. :func:`save_model_checkpoint` writes the same format for a model
changed after training (``after_fit`` links).
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from dgkit.callbacks import CONFIG_KEY, META_KEY
from dgkit.compose import build_backbone, build_datamodule, build_model, run_meta
from dgkit.methods.base import Method
from dgkit.search import without_search
from dgkit.utils.io import atomic_write

log = logging.getLogger(__name__)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict at ``path``, read with ``weights_only=True``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a readable dgkit checkpoint (truncated, pickled objects, no stored config).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (expected a run's checkpoints/best.ckpt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(
            f"{path} is not a loadable dgkit checkpoint: {type(err).__name__}: {str(err).splitlines()[0]} "
            "(truncated, or it holds pickled objects, which are never loaded)"
        ) from err
    if not isinstance(ckpt, dict) or CONFIG_KEY not in ckpt:
        raise ValueError(f"{path} has no '{CONFIG_KEY}': not a checkpoint written by dgkit's train.py")
    return ckpt


DATA_LOCATIONS = ("data.root", "paths.datasets")


def relocate_data(cfg: DictConfig, key: str, new: str | Path) -> None:
    """Point ``cfg`` at data that moved: ``key`` (``data.root`` or ``paths.datasets``) becomes ``new``, and every
    string under ``cfg.data`` that began with the old value is rebased onto it (checkpoints store resolved paths).

    Raises:
        FileNotFoundError: ``new`` does not exist.
    """
    new = Path(new).expanduser()
    if not new.exists():
        raise FileNotFoundError(f"{key}={new}: no such folder")
    old = OmegaConf.select(cfg, key)
    OmegaConf.update(cfg, key, str(new), force_add=True)
    if not old or "data" not in cfg:
        return
    old = str(old).rstrip("/")
    data = OmegaConf.to_container(cfg.data, resolve=False)
    cfg.data = _rebase(data, old, str(new))


def _rebase(value: Any, old: str, new: str) -> Any:
    """``value`` with every string equal to ``old`` or under ``old/`` moved under ``new``."""
    if isinstance(value, dict):
        return {k: _rebase(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_rebase(v, old, new) for v in value]
    if isinstance(value, str) and (value == old or value.startswith(old + "/")):
        return new + value[len(old) :]
    return value


def checkpoint_problem(path: str | Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be read (truncated, corrupt, not dgkit's), or ``None`` when it can."""
    try:
        read_checkpoint(path)
    except (FileNotFoundError, ValueError) as err:
        return str(err)
    return None


def load_checkpoint(path: str | Path, overrides: dict[str, Any] | None = None) -> tuple[DictConfig, Method]:
    """``(config, method)`` rebuilt from a dgkit checkpoint, weights loaded, method in eval mode, no dataset read.

    Pretrained-weight sources (``backbone.weights``, ``backbone.pretrained``) are switched off: the checkpoint
    holds every weight. ``overrides`` (dotted keys) change the stored config. The data locations
    ``data.root`` and ``paths.datasets`` relocate the data: every path of the stored (resolved) config that lay
    under the old location is moved under the new one, which must exist.
    Checkpoints written before the metadata existed are rebuilt through their dataset (with a warning).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a dgkit checkpoint, metadata keys missing, or weights that do not fit the rebuilt model
            (the missing and unexpected keys are named).
    """
    ckpt = read_checkpoint(path)
    cfg = OmegaConf.create(ckpt[CONFIG_KEY])
    if "backbone" in cfg:
        for key, value in (("weights", None), ("pretrained", False)):
            if key in cfg.backbone:
                cfg.backbone[key] = value
    for key, value in (overrides or {}).items():
        if key in DATA_LOCATIONS:
            relocate_data(cfg, key, value)
        else:
            OmegaConf.update(cfg, key, value, force_add=True)
    meta = ckpt.get(META_KEY) or _legacy_meta(cfg, path)
    method = build_model(cfg, meta)
    _load_weights(method, ckpt["state_dict"], path)
    return cfg, method.eval()


def load_checkpoint_and_data(
    path: str | Path, overrides: dict[str, Any] | None = None
) -> tuple[DictConfig, pl.LightningDataModule, Method]:
    """``(config, datamodule, method)``: :func:`load_checkpoint` plus the run's benchmark, for evaluation on it
    (TTA). The dataset must exist (``overrides={"data.root": ...}`` when it moved)."""
    cfg, method = load_checkpoint(path, overrides)
    return cfg, build_datamodule(cfg, method.backbone), method


def save_model_checkpoint(path: str | Path, config: dict[str, Any], method: Method) -> Path:
    """Write ``method`` (config, metadata and weights) atomically in the format :func:`load_checkpoint` reads."""
    state = {CONFIG_KEY: config, META_KEY: method.meta, "state_dict": method.state_dict()}
    return atomic_write(path, lambda f: torch.save(state, f), binary=True)


def _load_weights(method: Method, state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load strictly; on a mismatch name the missing and unexpected keys (a few of each)."""
    expected, given = set(method.state_dict()), set(state_dict)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise ValueError(
            f"{path}: the weights do not fit the model rebuilt from its config (another dgkit version or config?): "
            f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    method.load_state_dict(state_dict)


def _legacy_meta(cfg: DictConfig, path: str | Path) -> dict[str, Any]:
    """Metadata of a checkpoint written before ``dgkit_meta`` existed: read from its dataset (which must exist)."""
    log.warning("%s has no '%s' (an older dgkit): rebuilding it needs its dataset", path, META_KEY)
    backbone = build_backbone(cfg)
    adapter = [{"config": without_search(cfg.adapter), "stage": "before_fit", "state": {}}]
    return run_meta(cfg, build_datamodule(cfg, backbone), backbone, adapter if cfg.get("adapter") else [])
