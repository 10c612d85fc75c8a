"""Lightning callbacks the composition root adds to every run.

- :class:`ResultsWriter`: one JSON record per evaluation in ``results.jsonl`` (rewritten atomically), so
  any DomainBed selection rule can be applied afterwards.
- :class:`EvaluateAtLastStep`: an evaluation at the final step too (DomainBed evaluates at the last step,
  which the test-domain oracle reads), even when ``max_steps`` is not a multiple of the interval.
- :class:`RandomStateInCheckpoint`: the global random generators' states (torch, NumPy, Python) in every
  checkpoint, restored at the first training step after a resume, so a resumed run draws what the
  uninterrupted run drew (dropout, BSS, MixStyle...).
- :class:`ConfigInCheckpoint`: the resolved config and the run's metadata (task, classes, domains, held-out
  domains, preprocessing, transform-chain records) inside every checkpoint, so a checkpoint is rebuilt by
  instantiating its config, without its dataset and never by unpickling modules.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from dgkit.utils.io import atomic_write_jsonl, read_jsonl

CONFIG_KEY = "dgkit_config"
META_KEY = "dgkit_meta"


class ResultsWriter(pl.Callback):
    """Append ``{"step", "epoch", "<metric>/<domain>/<in|out>"...}`` to ``results.jsonl`` after each evaluation.

    Args:
        path: the ``results.jsonl`` file.
        metric: the task's metric key (``acc``): the logged ``val/<metric>/<domain>/<split>`` values are kept.
    """

    def __init__(self, path: str | Path, metric: str) -> None:
        self.path = Path(path)
        self.metric = metric

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """On resume, drop records newer than the restored step (they belong to the interrupted attempt)."""
        if trainer.is_global_zero:
            records = read_jsonl(self.path)
            kept = [r for r in records if r["step"] <= trainer.global_step]
            if len(kept) != len(records):
                atomic_write_jsonl(self.path, kept)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the record of this evaluation (replacing one at the same step)."""
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        record: dict[str, Any] = {"step": int(trainer.global_step), "epoch": int(trainer.current_epoch)}
        prefix = f"val/{self.metric}/"
        for key, value in trainer.callback_metrics.items():
            if key.startswith(prefix) and key.count("/") == 3:
                record[key.removeprefix("val/")] = float(value)
        records = [r for r in read_jsonl(self.path) if r["step"] != record["step"]]
        atomic_write_jsonl(self.path, sorted([*records, record], key=lambda r: r["step"]))


class EvaluateAtLastStep(pl.Callback):
    """Request an evaluation when ``max_steps`` is reached (Lightning validates on a stop request)."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Set ``should_stop`` at the last step so the validation loop runs before the fit ends."""
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True


class ConfigInCheckpoint(pl.Callback):
    """Store the resolved run config (a plain dict) under ``dgkit_config`` and the method's ``meta`` (see
    :func:`dgkit.compose.run_meta`) under ``dgkit_meta`` in every checkpoint."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """Add the config and the metadata to the checkpoint dict."""
        checkpoint[CONFIG_KEY] = self.config
        checkpoint[META_KEY] = pl_module.meta


class RandomStateInCheckpoint(pl.Callback):
    """Save the torch, NumPy and Python random states with every checkpoint; restore them on resume.

    They are restored just before the first training step after loading, not when the checkpoint is read:
    between those two moments Lightning builds data loaders, which draw from the global generator, and the
    uninterrupted run did not. The states are stored as tensors and plain ints (``weights_only`` loading).
    """

    KEY = "dgkit_random_state"

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """Store the current states."""
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        checkpoint[self.KEY] = {
            "torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)},
            "python": random.getstate(),
        }  # fmt: skip

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """Keep the stored states until the first training step."""
        self._pending = checkpoint.get(self.KEY)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Restore the stored states once, right before the first step after a resume."""
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        torch.set_rng_state(state["torch"])
        n = state["numpy"]
        keys = n["keys"].numpy().astype(np.uint32)
        np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached"]))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
