"""The composition root: the only place that turns config into objects.

- :func:`build` (training): backbone → ``before_fit`` links of the transform chain (the adapter) → DataModule
  (from the backbone's ``data_config``) → method with the task's head; the run's metadata (:func:`run_meta`)
  is attached to the method and stored in every checkpoint.
- :func:`build_model` (reloading, prediction, export): the same model from a config and that metadata alone,
  with no dataset: the chain is replayed from its records, so the structure fits the checkpoint's weights.
- :func:`build_datamodule`: the benchmark, for code that evaluates a rebuilt model on it (TTA).
- :func:`data_identity`: the held-out domains and data fingerprint, for the run folder's identity.
- :func:`build_trainer`: the Lightning trainer with dgkit's callbacks.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from dgkit.callbacks import ConfigInCheckpoint, EvaluateAtLastStep, FastPaths, RandomStateInCheckpoint, ResultsWriter
from dgkit.chain import TransformContext, apply_chain, chain_configs, replay_chain
from dgkit.data.style import BatchStylesStandardization
from dgkit.errors import root_cause
from dgkit.methods.base import Method
from dgkit.progress import EvaluationLog, StepProgressBar, quiet_lightning
from dgkit.search import without_search
from dgkit.tasks import Classification, Task

_CLASSIFICATION = "dgkit.tasks.Classification"
META_FORMAT = 2
log = logging.getLogger(__name__)
META_KEYS = ("format", "task", "dataset", "classes", "domains", "test_domains", "data_config", "chain")
"""What a checkpoint's ``dgkit_meta`` holds: enough to rebuild the model without its dataset."""


def build_backbone(cfg: DictConfig) -> nn.Module:
    """The configured backbone. With ``data.image_size: null`` (the folder presets) it is built at its own
    native input size: the backbone configs read ``data.image_size`` with their native size as the fallback,
    so the key is left out for them."""
    if "image_size" in cfg.get("data", {}) and cfg.data.image_size is None:
        cfg = copy.deepcopy(cfg)
        with open_dict(cfg):
            del cfg.data["image_size"]
    return instantiate(cfg.backbone)


def build_task(cfg: DictConfig) -> Task:
    """The configured task (``task=...``); classification for configs written before tasks were a group."""
    return instantiate(cfg.task) if cfg.get("task") else Classification()


def build_bss(cfg: DictConfig) -> BatchStylesStandardization | None:
    """Batch Styles Standardization from ``augment.bss`` (``+augment=bss``); ``None`` when absent or ``p=0``."""
    block = (cfg.get("augment") or {}).get("bss")
    if not block:
        return None
    bss = instantiate(without_search(block))  # validates r_min/r_max/p even when p=0
    return bss if bss.p > 0 else None


def build_datamodule(cfg: DictConfig, backbone: nn.Module) -> pl.LightningDataModule:
    """The benchmark's DataModule, its pipelines built from ``backbone.data_config``; each training image comes
    as many times as the method's ``train_views`` (SSL: 2)."""
    views = getattr(get_class(cfg.method._target_), "train_views", 1)
    return _instantiate_data(cfg.data, data_config=backbone.data_config, split_seed=cfg.seed, views=views)


def _instantiate_data(data: Any, **kwargs: Any) -> pl.LightningDataModule:
    """Instantiate a data config; a data error (missing folder, bad images, unknown domain) is raised as itself,
    not wrapped in Hydra's instantiation errors, so its message stays the first thing the user reads."""
    try:
        return instantiate(data, _partial_=True)(**kwargs)
    except InstantiationException as err:
        cause = root_cause(err)
        if isinstance(cause, ValueError | FileNotFoundError | RuntimeError):
            raise cause from None
        raise


def data_identity(cfg: DictConfig) -> dict[str, Any]:
    """The data part of a run's identity: the resolved held-out domains, the benchmark's fingerprint and the
    training-augmentation path (``DGDataModule.augment_path``) and the decoded cache read (``data_cache``).

    Built without image verification (cheap enough to decide whether a folder's run can be skipped or resumed).
    """
    data = OmegaConf.to_container(cfg.data, resolve=True)
    for block in (data, data.get("benchmark") or {}):
        if "verify" in block:
            block["verify"] = False
    datamodule = _instantiate_data(data, data_config=None, split_seed=cfg.seed)
    return {
        "test_domains": list(datamodule.test_domains),
        "data_fingerprint": datamodule.benchmark.fingerprint,
        "augment_path": datamodule.augment_path,
        "data_cache": datamodule.data_cache,
    }


def run_meta(cfg: DictConfig, datamodule: Any, backbone: nn.Module, chain: list[dict[str, Any]]) -> dict[str, Any]:
    """What a checkpoint stores to be rebuilt without its dataset (:data:`META_KEYS`)."""
    task = OmegaConf.to_container(cfg.task, resolve=True) if cfg.get("task") else {"_target_": _CLASSIFICATION}
    return {
        "format": META_FORMAT,
        "task": task,
        "dataset": datamodule.name,
        "classes": [str(c) for c in datamodule.benchmark.classes],
        "domains": list(datamodule.domains),
        "test_domains": list(datamodule.test_domains),
        "data_config": _plain(dataclasses.asdict(backbone.data_config)),
        "chain": chain,
    }


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively (checkpoint metadata holds plain containers only)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _method(cfg: DictConfig, backbone: nn.Module, meta: dict[str, Any], task: Task) -> Method:
    # _convert_="all": plain lists and dicts reach the method, so the hyper-parameters Lightning stores in every
    # checkpoint hold no OmegaConf objects (weights_only loading accepts plain containers only)
    return instantiate(without_search(cfg.method), _partial_=True, _convert_="all")(
        backbone=backbone,
        num_classes=len(meta["classes"]),
        domains=meta["domains"],
        test_domains=meta["test_domains"],
        task=task,
    )


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, Method]:
    """Instantiate the backbone, apply the chain's ``before_fit`` links (the adapter), then the DataModule and
    the method; return both.

    The adapter transforms the backbone after its weights are loaded and before the method is built, so every
    objective trains the adapted backbone; link callbacks (SoMA's annealed weight decay) reach the trainer
    through ``method.extra_callbacks``; ``augment.bss`` is attached as ``method.bss``; the run's metadata (with
    the chain's records) as ``method.meta``.
    """
    backbone = build_backbone(cfg)
    task = build_task(cfg)
    records, callbacks = apply_chain(chain_configs(cfg), backbone, TransformContext(stage="before_fit"))
    datamodule = build_datamodule(cfg, backbone)
    meta = run_meta(cfg, datamodule, backbone, records)
    method = _method(cfg, backbone, meta, task)
    method.use_eval_sets(datamodule.eval_names)
    method.meta = meta
    method.bss = build_bss(cfg)
    method.extra_callbacks = callbacks
    return datamodule, method


def apply_after_fit(configs: list[dict[str, Any]], method: Method, datamodule: Any) -> list[dict[str, Any]]:
    """Apply the ``after_fit`` links among ``configs`` (compression) to a trained method with its data for
    calibration; append their records to ``method.meta["chain"]`` (so the result reloads) and return them."""
    context = TransformContext(stage="after_fit", datamodule=datamodule)
    records, _ = apply_chain(configs, method, context)
    method.meta = {**method.meta, "chain": [*method.meta["chain"], *records]}
    return records


def build_model(cfg: DictConfig, meta: dict[str, Any]) -> Method:
    """The method of a run rebuilt from its config and checkpoint metadata, without any dataset.

    The backbone is built from ``cfg.backbone`` (the caller switches pretrained-weight sources off when the
    checkpoint holds every weight), the recorded chain is replayed around the method's construction, and the
    head is sized from the stored class names. Weights are not loaded here.

    Raises:
        ValueError: ``meta`` lacks keys (a checkpoint from another dgkit version), naming them.
    """
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"checkpoint metadata lacks {missing} (written by another dgkit version?)")
    backbone = build_backbone(cfg)
    replay_chain(meta["chain"], backbone, "before_fit")
    method = _method(cfg, backbone, meta, instantiate(meta["task"]))
    replay_chain(meta["chain"], method, "after_fit")
    method.meta = meta
    return method


class _StepsDone:
    """``log_metrics`` that records the number of optimisation steps done, as ``results.jsonl`` does.

    Lightning passes its 0-based batch index (the evaluation after step 300 reaches TensorBoard as step 299);
    shifting by one puts every logged value at the step count the run folder's records use. A class, not a
    closure, so the logger still pickles (``ddp_spawn``).
    """

    def __init__(self, log_metrics: Any) -> None:
        self.log_metrics = log_metrics

    def __call__(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.log_metrics(metrics, None if step is None else step + 1)


def _count_steps_done(logger: Any) -> None:
    """Make ``logger`` log at the number of steps done (:class:`_StepsDone`)."""
    logger.log_metrics = _StepsDone(logger.log_metrics)


DGKIT_TRAINER_KEYS = ("compile", "channels_last")  # trainer.* keys dgkit consumes (FastPaths), not Lightning


def build_trainer(cfg: DictConfig, out: Path, resolved: dict[str, Any], method: Method) -> pl.Trainer:
    """The Lightning trainer: best checkpoint by training-domain validation, last checkpoint to resume from,
    the results writer, an evaluation at the last step, and the config and metadata in every checkpoint."""
    callbacks: list[pl.Callback] = [
        ModelCheckpoint(  # best by training-domain validation
            dirpath=out / "checkpoints",
            filename="best",
            monitor=method.source_val_key,
            mode="max",
            auto_insert_metric_name=False,
            enable_version_counter=False,
            save_on_train_epoch_end=False,
        ),
        ModelCheckpoint(  # the latest evaluation, to resume from (Lightning's save_last only follows top-k saves)
            dirpath=out / "checkpoints",
            filename="last",
            monitor=None,
            enable_version_counter=False,
            save_on_train_epoch_end=False,
        ),
        ResultsWriter(out / "results.jsonl", method.task.metric),
        EvaluateAtLastStep(),
        RandomStateInCheckpoint(),
        ConfigInCheckpoint(resolved),
    ]
    callbacks.append(EvaluationLog())
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)  # resolved in place: interpolations may
    for key in DGKIT_TRAINER_KEYS:  # point outside the trainer node
        trainer_cfg.pop(key, None)
    fast = {k: bool(cfg.trainer.get(k, False)) for k in DGKIT_TRAINER_KEYS}
    if any(fast.values()):
        callbacks.append(FastPaths(**fast))
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(StepProgressBar(leave=True))
    quiet_lightning()
    logger_cfg = cfg.get("logger")
    logger = instantiate(logger_cfg) if logger_cfg and logger_cfg.get("_target_") else False
    if logger:
        _count_steps_done(logger)
    trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=logger, default_root_dir=str(out))
    if _relaunches_sweep(trainer):
        log.warning(
            "trainer.strategy=ddp inside a Hydra multirun: Lightning's ddp re-executes the command line in its child "
            "processes, which would relaunch the whole sweep; using ddp_spawn instead (same gradients and data split)"
        )
        trainer_cfg["strategy"] = "ddp_spawn"
        trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=logger, default_root_dir=str(out))
    return trainer


def _relaunches_sweep(trainer: pl.Trainer) -> bool:
    """Whether this is a Hydra multirun job whose strategy would start its processes by re-running the command
    line (Lightning's subprocess launcher, ``ddp`` without a cluster that starts them: Slurm tasks, torchrun)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from pytorch_lightning.strategies.launchers import _SubprocessScriptLauncher

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return False
    return isinstance(getattr(trainer.strategy, "launcher", None), _SubprocessScriptLauncher)


__all__ = [
    "META_KEYS",
    "apply_after_fit",
    "build",
    "build_bss",
    "build_datamodule",
    "build_model",
    "build_task",
    "build_trainer",
    "data_identity",
    "run_meta",
]
