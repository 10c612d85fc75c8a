"""The composition root: the only place that turns config into objects.

``train(cfg)`` builds backbone → data → method → trainer from the Hydra config, fits with DomainBed's
protocol, and writes the run folder atomically:

- ``config.yaml``: the resolved config; ``run.json``: what result collection needs (dataset, domains,
  test domains, seed, tag, hyper-parameter id);
- ``results.jsonl``: one record per evaluation; ``checkpoints/best.ckpt`` (training-domain validation) and
  ``checkpoints/last.ckpt``;
- ``final.json``: the selected step and its per-domain accuracies; ``done``: written last;
- ``backbone.safetensors``: the last step's backbone, for methods that export it (self-supervised ones) or when
  ``export_backbone=true`` (supervised pre-training), in the format ``backbone.weights=PATH`` reads.

Rerunning the same command resumes from ``last.ckpt``; a finished run (``done``) is skipped.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from peft.tuners.tuners_utils import BaseTunerLayer
from pytorch_lightning.callbacks import ModelCheckpoint, RichProgressBar
from safetensors.torch import save as safetensors_bytes
from torch import nn

from dgkit.adapters import AdapterLinear, SplitQKV, merge
from dgkit.callbacks import ConfigInCheckpoint, EvaluateAtLastStep, ResultsWriter
from dgkit.data.style import BatchStylesStandardization
from dgkit.methods.base import SOURCE_VAL_METRIC
from dgkit.report import print_summary, summarise_run
from dgkit.utils.io import atomic_write, atomic_write_json, atomic_write_text, read_jsonl

log = logging.getLogger(__name__)

# Keys that do not change what is learned: left out of the hyper-parameter id.
_RUN_KEYS = (
    "seed", "output_dir", "resume", "threads", "logger", "paths", "tag", "print_summary", "export_backbone", "tta",
)  # fmt: skip
_DATA_RUN_KEYS = ("test_domains", "root", "num_workers", "eval_batch_size")
_TRAINER_RUN_KEYS = ("devices", "accelerator", "enable_progress_bar", "log_every_n_steps", "num_nodes")

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*`isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
# Resuming is deliberate: the checkpoint folder is ours, and a resumed run draws new batches (the per-domain
# loaders are shuffled afresh), which Lightning warns about.
warnings.filterwarnings("ignore", ".*Checkpoint directory .* exists and is not empty.*")
warnings.filterwarnings("ignore", ".*resuming from a checkpoint that ended before the epoch ended.*")


def hparams_id(cfg: DictConfig) -> str:
    """A short id of everything that defines the learning problem except seed and held-out domains.

    Hashed before interpolations are resolved, so where the data lives (``paths``, ``data.root`` and what
    interpolates them) does not make the same configuration a second hyper-parameter candidate.
    """
    c = OmegaConf.to_container(cfg, resolve=False)
    for key in _RUN_KEYS:
        c.pop(key, None)
    for key in _DATA_RUN_KEYS:
        c.get("data", {}).pop(key, None)
    for key in _TRAINER_RUN_KEYS:
        c.get("trainer", {}).pop(key, None)
    augment = c.get("augment") or {}
    for key in [k for k, block in augment.items() if isinstance(block, dict) and block.get("p") == 0]:
        augment.pop(key)  # a disabled augmentation learns the same thing as none
    if not augment:
        c.pop("augment", None)
    if (c.get("adapter") or {}).get("_target_") == "dgkit.adapters.FullFineTuning":
        c.pop("adapter")  # full fine-tuning learns what a config without the adapter group learned
    return hashlib.sha1(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:8]


def build_bss(cfg: DictConfig) -> BatchStylesStandardization | None:
    """Batch Styles Standardization from ``augment.bss`` (``+augment=bss``); ``None`` when absent or ``p=0``."""
    block = (cfg.get("augment") or {}).get("bss")
    if not block:
        return None
    bss = instantiate(block)  # validates r_min/r_max/p even when p=0
    return bss if bss.p > 0 else None


def default_tag(cfg: DictConfig, method: pl.LightningModule) -> str:
    """The result-table row label when ``tag`` is unset: the method's class name, plus the adapter's class name
    unless the backbone is fully fine-tuned (``ERM``, ``ERM+LoRA``, ``DANN+SoMA``)."""
    target = (cfg.get("adapter") or {}).get("_target_", "")
    adapter = target.rsplit(".", 1)[-1]
    if not adapter or adapter == "FullFineTuning":
        return type(method).__name__
    return f"{type(method).__name__}+{adapter}"


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule]:
    """Instantiate the backbone, apply the adapter, then the DataModule (using the backbone's data config) and the
    method.

    The adapter (``adapter=...``) transforms the backbone after its weights are loaded and before the method is
    built, so every objective trains the adapted backbone; its callbacks (SoMA's annealed weight decay) reach the
    trainer through ``method.extra_callbacks``. The DataModule gives each training image as many augmented views
    as the method's ``train_views`` (SSL: 2); ``augment.bss`` is attached to the method as ``method.bss``.
    """
    backbone = instantiate(cfg.backbone)
    adapter = instantiate(cfg.adapter) if cfg.get("adapter") else None
    if adapter is not None:
        adapter.apply(backbone)
    views = getattr(get_class(cfg.method._target_), "train_views", 1)
    datamodule = instantiate(cfg.data, _partial_=True)(
        data_config=backbone.data_config, split_seed=cfg.seed, views=views
    )
    method = instantiate(cfg.method, _partial_=True)(
        backbone=backbone,
        num_classes=datamodule.num_classes,
        domains=datamodule.domains,
        test_domains=datamodule.test_domains,
    )
    method.bss = build_bss(cfg)
    method.extra_callbacks = adapter.callbacks() if adapter is not None else []
    return datamodule, method


def _weights_module(backbone: nn.Module) -> nn.Module:
    """The module whose state dict ``backbone.weights=PATH`` loads into: a wrapped timm model, else the backbone."""
    inner = getattr(backbone, "model", None)
    return inner if isinstance(inner, nn.Module) else backbone


def export_backbone(backbone: nn.Module, path: str | Path) -> Path:
    """Write ``backbone``'s weights to ``path`` (safetensors, atomically) in the key space its loader reads."""
    if any(isinstance(m, AdapterLinear | BaseTunerLayer | SplitQKV) for m in backbone.modules()):
        backbone = merge(copy.deepcopy(backbone))  # adapters folded: the file fits the plain architecture
    state = {k: v.detach().cpu().contiguous() for k, v in _weights_module(backbone).state_dict().items()}
    return atomic_write(path, lambda f: f.write(safetensors_bytes(state)), binary=True)


def _resume_mode(cfg: DictConfig) -> str:
    mode = str(cfg.get("resume", "auto")).lower()
    if mode not in ("auto", "true", "false"):
        raise ValueError(f"resume={cfg.resume!r}; choose one of auto, true, false")
    return mode


def _check_same_run(cfg: DictConfig, out: Path) -> None:
    """Refuse to skip or resume a run folder that holds a run of another configuration or seed."""
    previous = out / "run.json"
    if not previous.exists():
        return
    old = json.loads(previous.read_text())
    new = {"hparams": hparams_id(cfg), "seed": int(cfg.seed)}
    changed = [k for k in new if old.get(k) != new[k]]
    if changed:
        raise ValueError(
            f"{out} holds a run with other {' and '.join(changed)} ({old.get('hparams')}, seed {old.get('seed')}): "
            "the config changed since it was trained. Pass resume=false to train it again from scratch, "
            "or choose another output folder (hydra.run.dir=... / hydra.sweep.dir=...)."
        )


def _clear_run(out: Path) -> None:
    """``resume=false``: forget the previous attempt (records, checkpoints, outcome) before starting over."""
    for name in ("results.jsonl", "final.json", "done"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)


def _resume_path(cfg: DictConfig, out: Path, mode: str) -> str | None:
    last = out / "checkpoints" / "last.ckpt"
    if mode == "true" and not last.exists():
        raise FileNotFoundError(f"resume=true but there is no checkpoint at {last}")
    return str(last) if mode != "false" and last.exists() else None


def _trainer(cfg: DictConfig, out: Path, resolved: dict[str, Any]) -> pl.Trainer:
    callbacks: list[pl.Callback] = [
        ModelCheckpoint(  # best by training-domain validation
            dirpath=out / "checkpoints",
            filename="best",
            monitor=SOURCE_VAL_METRIC,
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
        ResultsWriter(out / "results.jsonl"),
        EvaluateAtLastStep(),
        ConfigInCheckpoint(resolved),
    ]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(RichProgressBar(leave=True))
    logger_cfg = cfg.get("logger")
    logger = instantiate(logger_cfg) if logger_cfg and logger_cfg.get("_target_") else False
    return instantiate(cfg.trainer, callbacks=callbacks, logger=logger, default_root_dir=str(out))


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train one run as configured and return its ``final.json`` content."""
    out = Path(cfg.output_dir)
    mode = _resume_mode(cfg)
    if mode == "false":
        _clear_run(out)
    else:
        _check_same_run(cfg, out)
    if (out / "done").exists():
        log.info("%s is already finished (done marker); pass resume=false to train it again", out)
        final = json.loads((out / "final.json").read_text())
        if cfg.get("print_summary", True):
            print_summary(final, final["domains"], final["test_domains"])
        if _tta_requested(cfg) and _tta_requested(cfg) not in final.get("tta", {}):
            final = _with_tta(cfg, out, final)
        return final
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, method = build(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    tag = cfg.get("tag") or default_tag(cfg, method)
    run_info = {
        "dataset": datamodule.name,
        "domains": datamodule.domains,
        "test_domains": datamodule.test_domains,
        "seed": int(cfg.seed),
        "tag": tag,
        "hparams": hparams_id(cfg),
    }
    atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(resolved))
    atomic_write_json(out / "run.json", run_info)
    ckpt_path = _resume_path(cfg, out, mode)
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    trainer = _trainer(cfg, out, resolved)
    trainer.fit(method, datamodule=datamodule, ckpt_path=ckpt_path)
    if not trainer.is_global_zero:
        return {}
    final = summarise_run(read_jsonl(out / "results.jsonl"), datamodule.domains, datamodule.test_domains)
    final.update(run_info, best_checkpoint=str(out / "checkpoints" / "best.ckpt"))
    if method.exports_backbone or cfg.get("export_backbone", False):
        weights = export_backbone(method.backbone, out / "backbone.safetensors")
        final["backbone_weights"] = str(weights)
        log.info("backbone weights of step %d exported: backbone.weights=%s", trainer.global_step, weights)
    atomic_write_json(out / "final.json", final)
    if cfg.get("print_summary", True):
        print_summary(final, datamodule.domains, datamodule.test_domains)
    if _tta_requested(cfg):
        final = _with_tta(cfg, out, final)
    atomic_write_text(out / "done", "")
    return final


def _tta_requested(cfg: DictConfig) -> str | None:
    """The name of the TTA to evaluate after training (``tta=...``), or ``None`` for ``tta=none`` / no group."""
    block = cfg.get("tta")
    if not block or not block.get("_target_") or block._target_.endswith(".NoAdaptation"):
        return None
    return get_class(block._target_).name


def _with_tta(cfg: DictConfig, out: Path, final: dict[str, Any]) -> dict[str, Any]:
    """Evaluate the selected checkpoint (``best.ckpt``) with ``cfg.tta`` on the held-out domains, write
    ``tta/<name>_bs<batch>.json`` and add a per-domain summary under ``final.json``'s ``tta`` key."""
    from dgkit.tta.runner import format_result, run_tta  # imported late: it imports this module's build()

    tta = instantiate(cfg.tta)
    result, path = run_tta(
        out / "checkpoints" / "best.ckpt", tta, OmegaConf.to_container(cfg.tta, resolve=True), seed=int(cfg.seed)
    )
    log.info("test-time adaptation of the selected checkpoint:\n%s\nwritten to %s", format_result(result), path)
    if cfg.get("print_summary", True):
        print(format_result(result))
    sets = {d: {"acc_none": r["acc_none"], "acc_tta": r["acc_tta"]} for d, r in result["sets"].items()}
    entry = {"batch_size": tta.batch_size, "sets": sets, "time_ratio": result["time_ratio"], "file": str(path)}
    final = {**final, "tta": {**final.get("tta", {}), tta.name: entry}}
    atomic_write_json(out / "final.json", final)
    return final
