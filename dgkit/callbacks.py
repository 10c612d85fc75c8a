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
        metric: the task's metric key (``acc``). Every logged ``val/<key>/<domain>/<split>`` value is kept: the
            metric's and the task's secondary scores (``Task.secondary_scores``: Dice, per-class IoU...).
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
        for key, value in trainer.callback_metrics.items():
            if key.startswith("val/") and key.count("/") == 3:
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


class FastPaths(pl.Callback):
    """``trainer.compile`` and ``trainer.channels_last``: speed options that do not change what is learned.

    - ``compile``: the backbone's ``__call__`` is compiled with ``torch.compile`` (``nn.Module.compile``, in place:
      parameter names and checkpoints are unchanged) for the fit, and uncompiled when it ends, so
      :meth:`~dgkit.methods.base.Method.to_inference` copies a plain module. Objectives that back-propagate
      through a gradient (UDIM, ITTA: double backward) are refused: compiled graphs have no double backward.
    - ``channels_last``: the whole module, and every 4-D image batch entering the backbone (a forward pre-hook,
      removed when the fit ends), in ``torch.channels_last`` memory format, the format cuDNN's and oneDNN's
      fastest convolutions use. Values and shapes are unchanged. Only CNNs gain; a ViT's only 4-D weight is its
      patch embedding. (A hook, not ``on_after_batch_transfer``: the DataModule may own that hook.)
    """

    def __init__(self, compile: bool = False, channels_last: bool = False) -> None:  # noqa: A002 (the config key)
        self.compile = bool(compile)
        self.channels_last = bool(channels_last)
        self._hook: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Convert the module and compile the backbone before the first step."""
        if stage != "fit":
            return
        if self.channels_last:
            pl_module.to(memory_format=torch.channels_last)
            self._hook = pl_module.backbone.register_forward_pre_hook(lambda _, args: to_channels_last(args))
        if self.compile:
            if getattr(pl_module, "double_backward", False):
                raise ValueError(
                    f"trainer.compile=true: {type(pl_module).__name__} back-propagates through a gradient "
                    "(double backward), which torch.compile does not support; drop trainer.compile"
                )
            pl_module.backbone.compile()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Uncompile the backbone (``nn.Module.compile`` keeps the compiled call in ``_compiled_call_impl``) and
        remove the channels_last input hook (parameters stay in channels_last: same values)."""
        if stage != "fit":
            return
        if self.compile:
            pl_module.backbone._compiled_call_impl = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def to_channels_last(batch: Any) -> Any:
    """``batch`` (tensors in dicts, lists, tuples) with its 4-D floating-point tensors in channels_last format."""
    if isinstance(batch, torch.Tensor):
        image = batch.ndim == 4 and batch.is_floating_point()
        return batch.contiguous(memory_format=torch.channels_last) if image else batch
    if isinstance(batch, dict):
        return {k: to_channels_last(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        items = [to_channels_last(v) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    return batch
