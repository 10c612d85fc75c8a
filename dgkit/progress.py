"""Progress that tells the time: a step bar for interactive runs, one log line per evaluation for sweeps.

- :class:`StepProgressBar` (Rich, ``trainer.enable_progress_bar=true``): ``step k/max_steps`` with elapsed and
  remaining time, the loss and the last source validation; Lightning's epoch counter (meaningless with
  endless per-domain streams: it read ``Epoch 7/-2``) and its ``v_num`` are left out.
- :class:`EvaluationLog` (always on): after each evaluation, one ``INFO`` line with the step, the time elapsed
  and left, the source validation score and the held-out scores, so a sweep's log (bar off) shows progress.

:func:`quiet_lightning` drops Lightning's logger advertisement.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar

log = logging.getLogger("dgkit.progress")


def format_seconds(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3725`` -> ``1h02m``; ``9`` -> ``9s``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class StepProgressBar(RichProgressBar):
    """Rich progress counted in optimisation steps out of ``trainer.max_steps`` (see the module docstring)."""

    @property
    def total_train_batches(self) -> int | float:
        """``max_steps`` (the bar's total), or Lightning's count when no step budget is set."""
        return self.trainer.max_steps if self.trainer.max_steps > 0 else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return "train"

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Advance to ``global_step`` (not the batch index within an epoch: right after a resume too)."""
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The logged progress-bar metrics without Lightning's ``v_num``."""
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


class EvaluationLog(pl.Callback):
    """One log line per evaluation: step, time elapsed and left, source validation and held-out scores.

    The time left extrapolates this session's pace (steps done since the fit started or resumed).
    """

    def __init__(self) -> None:
        self._start: float | None = None
        self._first_step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the clock (at the restored step when resuming)."""
        self._start, self._first_step = time.monotonic(), trainer.global_step

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the line (not for Lightning's sanity check)."""
        if trainer.sanity_checking or self._start is None or not trainer.is_global_zero:
            return
        log.info(self.line(trainer, pl_module, time.monotonic() - self._start))

    def line(self, trainer: pl.Trainer, pl_module: Any, elapsed: float) -> str:
        """The text of one evaluation's line."""
        step, total = trainer.global_step, trainer.max_steps
        done = step - self._first_step
        left = elapsed / done * (total - step) if done > 0 and total > 0 else float("nan")
        metric = pl_module.task.metric
        scores = trainer.callback_metrics
        parts = [f"step {step}/{total}" if total > 0 else f"step {step}", f"{format_seconds(elapsed)} elapsed"]
        if left == left:  # not NaN
            parts.append(f"~{format_seconds(left)} left")
        source = scores.get(pl_module.source_val_key)
        if source is not None:
            parts.append(f"source validation {metric} {100 * float(source):.1f}")
        held = [
            f"{t} {100 * float(scores[k]):.1f}"
            for t in pl_module.test_domains
            if (k := f"val/{metric}/{t}/in") in scores
        ]
        if held:
            parts.append(f"held-out {metric} {', '.join(held)}")
        return " | ".join(parts)


class _DropAdvertisement(logging.Filter):
    """Drop Lightning's logger advertisement (a 'Tip' line naming a hosted service) from its INFO output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage().lower()


def quiet_lightning() -> None:
    """Install the advertisement filter on Lightning's rank-zero logger (idempotent)."""
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, _DropAdvertisement) for f in logger.filters):
        logger.addFilter(_DropAdvertisement())
