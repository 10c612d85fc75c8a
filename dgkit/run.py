"""One training run, end to end: ``train(cfg)`` is what ``train.py`` calls.

It ties the parts together, each in its own module: the run folder's lifecycle (:mod:`dgkit.runfolder`: resume,
skip, start over, atomic outcome files), composition (:mod:`dgkit.compose`: config to backbone, chain, data,
method, trainer), the run's identity (:mod:`dgkit.identity`, :mod:`dgkit.labels`), the fit, the outcome
(:mod:`dgkit.report`), the chain's ``after_fit`` links, backbone export (:mod:`dgkit.export`) and an optional
test-time adaptation of the selected checkpoint (:mod:`dgkit.tta.runner`).

The run folder holds ``config.yaml``, ``run.json`` (dataset, domains, test domains, seed, tag, hyper-parameter
id, the task's metric and the algorithm-defining choices), ``results.jsonl``, ``checkpoints/{best,last}.ckpt``
(``transformed.ckpt`` when the chain has ``after_fit`` links), ``final.json``, ``backbone.safetensors`` (SSL runs
or ``export_backbone=true``) and ``done``, written last.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from dgkit.chain import chain_budget_dependence, chain_configs, chain_stages
from dgkit.checkpoint import checkpoint_problem, read_checkpoint, save_model_checkpoint
from dgkit.compose import apply_after_fit, build, build_trainer, data_identity
from dgkit.compress.runner import compress_checkpoint, compress_name, format_change
from dgkit.export import export_backbone
from dgkit.identity import hparams_id
from dgkit.labels import algorithm_choices, default_tag
from dgkit.report import print_summary, summarise_run
from dgkit.runfolder import RunFolder
from dgkit.search import apply_hparams_seed, without_search
from dgkit.tta.runner import format_result, run_tta
from dgkit.utils.io import read_jsonl

log = logging.getLogger(__name__)

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*`isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
# Resuming is deliberate: the checkpoint folder is ours, and a resumed run draws new batches (the per-domain
# loaders are shuffled afresh), which Lightning warns about.
warnings.filterwarnings("ignore", ".*Checkpoint directory .* exists and is not empty.*")
warnings.filterwarnings("ignore", ".*resuming from a checkpoint that ended before the epoch ended.*")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train one run as configured and return its ``final.json`` content.

    The run folder is locked for the whole call. A finished run of the same identity is skipped (its summary is
    printed), or extended when ``trainer.max_steps`` grew; an interrupted one resumes exactly.
    """
    folder = RunFolder(cfg.output_dir, cfg.get("resume", "auto"))
    if launched_rank() > 0:  # a DDP process Lightning started by re-running the command: rank 0 owns the folder
        return _train(cfg, folder, owner=False)
    with folder.lock():
        return _train(cfg, folder)


def launched_rank() -> int:
    """This process's rank when a launcher started it (Lightning's ``ddp`` subprocesses set ``LOCAL_RANK``;
    Slurm sets ``SLURM_PROCID``), else 0."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if os.environ.get(key) is not None:
            return int(os.environ[key])
    return 0


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """What must match for a run folder to be resumed or skipped into (:data:`dgkit.runfolder.IDENTITY_KEYS`),
    plus the full hyper-parameter id (compared for folders written before the identity existed)."""
    trainer = cfg.trainer
    return {
        "config": hparams_id(cfg, budget=False),
        "hparams": hparams_id(cfg),
        "seed": int(cfg.seed),
        **data_identity(cfg),
        "devices": f"{trainer.get('devices', 'auto')}x{trainer.get('num_nodes', 1)}",
    }


_MISSING_HINTS = {
    "data.root": "pass data.root=PATH, the folder holding <domain>/<class>/<image> files (see datasets/README.md)",
    "data.test_domains": "pass data.test_domains=[NAME], the held-out domain(s)",
    "backbone.weights": "pass backbone.weights=PATH (e.g. an SSL run's backbone.safetensors) or backbone.weights=null",
}


def check_required(cfg: DictConfig) -> None:
    """Refuse a config with unset mandatory values (``???``), naming each key and how to set it.

    Raises:
        ValueError: one line per missing key.
    """
    missing = sorted(_missing(OmegaConf.to_container(cfg, resolve=False)))  # unresolved: '???' stays visible
    if missing:
        lines = [f"  {k}: {_MISSING_HINTS.get(k, f'set it on the command line ({k}=VALUE)')}" for k in missing]
        raise ValueError("the config leaves required values unset:\n" + "\n".join(lines))


def _missing(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose value is OmegaConf's mandatory marker ``???``."""
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in _missing(value, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == "???" else []


def _train(cfg: DictConfig, folder: RunFolder, owner: bool = True) -> dict[str, Any]:
    """Train in ``folder``; ``owner=False`` (a DDP process of rank > 0) trains without touching the folder."""
    check_required(cfg)
    draws = apply_hparams_seed(cfg)  # before the identity: drawn values are hyper-parameters
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    identity = run_identity(cfg)
    if owner:
        folder.prepare(identity)
    previous, max_steps = folder.previous(), int(cfg.trainer.max_steps)
    if owner and folder.finished and previous.get("max_steps", max_steps) == max_steps:
        log.info("%s is already finished (done marker); pass resume=false to train it again", folder.path)
        final = folder.read_final()
        if cfg.get("print_summary", True):
            print_summary(final, final["domains"], final["test_domains"])
        if _tta_requested(cfg) and _tta_requested(cfg) not in final.get("tta", {}):
            final = _with_tta(cfg, folder, final)
        if _compress_requested(cfg) and _compress_requested(cfg) not in final.get("compress", {}):
            final = _with_compress(cfg, folder, final)
        return final
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, method = build(cfg)
    if owner and folder.claimed and folder.mode != "false":
        _check_budget(cfg, folder, previous, max_steps, method)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    run_info = {
        "dataset": datamodule.name,
        "domains": datamodule.domains,
        **identity,
        "tag": cfg.get("tag") or default_tag(cfg),
        "hparams_seed": int(cfg.get("hparams_seed") or 0),
        "draws": draws,
        "max_steps": max_steps,
        "metric": method.task.metric,
        "metric_name": method.task.metric_name,
        "choices": algorithm_choices(cfg),
        "skipped_images": len(datamodule.benchmark.skipped),
    }
    if owner:
        folder.write_start(OmegaConf.to_yaml(resolved), run_info)
    ckpt_path = folder.resume_checkpoint(checkpoint_problem)
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    trainer = build_trainer(cfg, folder.path, resolved, method)
    trainer.fit(method, datamodule=datamodule, ckpt_path=ckpt_path)
    if not trainer.is_global_zero:
        return {}
    task = method.task
    final = summarise_run(
        read_jsonl(folder.results), datamodule.domains, datamodule.test_domains, task.metric, task.metric_name
    )
    final.update(run_info, best_checkpoint=str(folder.best_checkpoint))
    if method.exports_backbone or cfg.get("export_backbone", False):
        weights = export_backbone(method.backbone, folder.path / "backbone.safetensors")
        final["backbone_weights"] = str(weights)
        log.info("backbone weights of step %d exported: backbone.weights=%s", trainer.global_step, weights)
    transformed = _after_fit(cfg, folder, resolved, method, datamodule)
    if transformed:
        final["transformed_checkpoint"] = transformed
    folder.write_final(final)
    if cfg.get("print_summary", True):
        print_summary(final, datamodule.domains, datamodule.test_domains)
        best = folder.best_checkpoint
        print(f"selected checkpoint: {best}\n  python scripts/evaluate.py ckpt={best} tta=tent")
        print(f"  python scripts/predict.py ckpt={best} images=DIR")
    if _tta_requested(cfg):
        final = _with_tta(cfg, folder, final)
    if _compress_requested(cfg):
        final = _with_compress(cfg, folder, final)
    folder.mark_done()
    return final


def _check_budget(cfg: DictConfig, folder: RunFolder, previous: dict[str, Any], max_steps: int, method) -> None:
    """A claimed folder trained under another ``trainer.max_steps``: allow continuing to a larger budget when
    nothing depends on it (reopening a finished run), refuse otherwise with what depends on it."""
    before = previous.get("max_steps")
    if before is None or before == max_steps:
        return
    where = f"{folder.path} holds a run of trainer.max_steps={before}; this command asks for {max_steps}."
    fix = "Choose another output folder, or pass resume=false to train it again from scratch."
    if max_steps < before:
        raise ValueError(f"{where} A run cannot be shortened after the fact. {fix}")
    reasons = method.step_budget_dependence() + chain_budget_dependence(chain_configs(cfg))
    if reasons:
        raise ValueError(
            f"{where} It cannot be extended honestly: {'; '.join(reasons)} depend(s) on the step budget, so its "
            f"first {before} steps followed another schedule. {fix}"
        )
    log.info("extending %s from %d to %d steps", folder.path, before, max_steps)
    folder.reopen()


def _after_fit(cfg: DictConfig, folder: RunFolder, resolved: dict[str, Any], method, datamodule) -> str | None:
    """Apply the chain's ``after_fit`` links to the selected weights (``best.ckpt``) and write
    ``checkpoints/transformed.ckpt``; ``None`` when the chain has none."""
    if "after_fit" not in chain_stages(chain_configs(cfg)):
        return None
    method.load_state_dict(read_checkpoint(folder.best_checkpoint)["state_dict"])
    apply_after_fit(chain_configs(cfg), method, datamodule)
    path = save_model_checkpoint(folder.checkpoints / "transformed.ckpt", resolved, method)
    log.info("after-fit transforms applied to the selected step; written to %s", path)
    return str(path)


def _tta_requested(cfg: DictConfig) -> str | None:
    """The name of the TTA to evaluate after training (``tta=...``), or ``None`` for ``tta=none`` / no group."""
    block = cfg.get("tta")
    if not block or not block.get("_target_") or block._target_.endswith(".NoAdaptation"):
        return None
    return get_class(block._target_).name


def _with_tta(cfg: DictConfig, folder: RunFolder, final: dict[str, Any]) -> dict[str, Any]:
    """Evaluate the selected checkpoint (``best.ckpt``) with ``cfg.tta`` on the held-out domains, write
    ``tta/<name>_bs<batch>.json`` and add a per-domain summary under ``final.json``'s ``tta`` key."""
    tta = instantiate(without_search(cfg.tta))  # the drawn values, not the search space
    result, path = run_tta(folder.best_checkpoint, tta, without_search(cfg.tta), seed=int(cfg.seed))
    if cfg.get("print_summary", True):
        print(format_result(result))  # once: not logged too (Hydra's console logging would repeat it)
    log.info("test-time adaptation of the selected checkpoint written to %s", path)
    key = result["metric"]  # the task's metric: acc_none/acc_tta for classification, miou_none/miou_tta...
    sets = {d: {f"{key}_none": r[f"{key}_none"], f"{key}_tta": r[f"{key}_tta"]} for d, r in result["sets"].items()}
    entry = {"batch_size": tta.batch_size, "metric": key, "sets": sets, "time_ratio": result["time_ratio"],
             "file": str(path)}  # fmt: skip
    final = {**final, "tta": {**final.get("tta", {}), tta.name: entry}}
    folder.write_final(final)
    return final


def _compress_requested(cfg: DictConfig) -> str | None:
    """The name of the compression to apply to the selected checkpoint (``compress=NAME``), or ``None``."""
    block = cfg.get("compress")
    if not block or not block.get("_target_"):
        return None
    return compress_name(block)


def _with_compress(cfg: DictConfig, folder: RunFolder, final: dict[str, Any]) -> dict[str, Any]:
    """Compress the selected checkpoint (``best.ckpt``) with ``cfg.compress`` into ``variants/<name>/`` (a row of
    the result tables) and add its held-out scores before and after under ``final.json``'s ``compress`` key."""
    name = _compress_requested(cfg)
    result = compress_checkpoint(folder.best_checkpoint, cfg.compress, name)
    metric = final["metric"]
    if cfg.get("print_summary", True):
        print(format_change(result, final["test_domains"], metric))
    held_out = {t: {"before": result["before"][f"{metric}/{t}/in"], "after": result["after"][f"{metric}/{t}/in"]}
                for t in final["test_domains"]}  # fmt: skip
    entry = {"label": result["label"], "folder": result["folder"], "test_score": held_out}
    final = {**final, "compress": {**final.get("compress", {}), name: entry}}
    folder.write_final(final)
    return final
