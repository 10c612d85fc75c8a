"""Lightning callbacks the composition root adds to every run.

- :class:`ResultsWriter`: one JSON record per evaluation in ``results.jsonl`` (rewritten atomically), so
  any DomainBed selection rule can be applied afterwards.
- :class:`EvaluateAtLastStep`: an evaluation at the final step too (DomainBed evaluates at the last step,
  which the test-domain oracle reads), even when ``max_steps`` is not a multiple of the interval.
- :class:`ConfigInCheckpoint`: the resolved config and the run's metadata (task, classes, domains, held-out
  domains, preprocessing, transform-chain records) inside every checkpoint, so a checkpoint is rebuilt by
  instantiating its config, without its dataset and never by unpickling modules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl

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
