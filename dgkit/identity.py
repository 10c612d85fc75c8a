"""A run's hyper-parameter identity: the short id that result collection groups candidates by.

Runs with equal dataset, tag and id differ only in seed and held-out domains; different ids under one tag are
the hyper-parameter candidates that model selection chooses between (DomainBed's ``hparams_seed``).
"""

from __future__ import annotations

import hashlib
import json

from omegaconf import DictConfig, OmegaConf

# Keys that do not change what is learned: left out of the hyper-parameter id.
RUN_KEYS = (
    "seed", "output_dir", "resume", "threads", "logger", "paths", "tag", "print_summary", "export_backbone", "tta",
    "compress",
)  # fmt: skip
DATA_RUN_KEYS = ("test_domains", "root", "num_workers", "eval_batch_size", "crafted_families", "cache")
TRAINER_RUN_KEYS = (
    "devices", "accelerator", "enable_progress_bar", "log_every_n_steps", "num_nodes", "strategy",
    "use_distributed_sampler", "compile", "channels_last",
)  # fmt: skip
_DEFAULT_TASK = "dgkit.tasks.Classification"


def hparams_id(cfg: DictConfig, budget: bool = True) -> str:
    """A short id of everything that defines the learning problem except seed and held-out domains.

    With ``budget=False`` the step budget (``trainer.max_steps``) is left out too: that id is the run folder's
    identity, so a finished run can be extended to more steps (see :mod:`dgkit.runfolder`), while result
    collection groups by the full id.

    Hashed before interpolations are resolved, so where the data lives (``paths``, ``data.root`` and what
    interpolates them) does not make the same configuration a second hyper-parameter candidate. Defaults that
    learn what older configs learned (classification task, empty transform chain, full fine-tuning, a disabled
    augmentation, ``data.shots: null``) are left out, so ids stay those of the runs already collected.
    """
    c = OmegaConf.to_container(cfg, resolve=False)
    if not c.get("hparams_seed"):
        c.pop("hparams_seed", None)  # 0 trains the defaults: the id of a config without the key
    for key in RUN_KEYS:
        c.pop(key, None)
    for block in [c.get("method"), c.get("adapter"), *(c.get("augment") or {}).values()]:
        if isinstance(block, dict):
            block.pop("search", None)  # where a value may be drawn from, not a value
    for key in DATA_RUN_KEYS:
        c.get("data", {}).pop(key, None)
    # data.cache (a loading option, as the augmentation path) is in the run folder's identity (``data_cache``), not
    # in the hyper-parameters: uncached configs keep their ids
    (c.get("data", {}).get("benchmark") or {}).pop("cache", None)
    if c.get("data", {}).get("shots", 0) is None:
        c["data"].pop("shots")  # every image of the in split: what configs without the key trained on
    for key in TRAINER_RUN_KEYS + (() if budget else ("max_steps",)):
        c.get("trainer", {}).pop(key, None)
    augment = c.get("augment") or {}
    for key in [k for k, block in augment.items() if isinstance(block, dict) and block.get("p") == 0]:
        augment.pop(key)  # a disabled augmentation learns the same thing as none
    if not augment:
        c.pop("augment", None)
    if (c.get("adapter") or {}).get("_target_") == "dgkit.adapters.FullFineTuning":
        c.pop("adapter")  # full fine-tuning learns what a config without the adapter group learned
    if (c.get("task") or {}).get("_target_") == _DEFAULT_TASK and len(c["task"]) == 1:
        c.pop("task")  # classification, the only task before tasks were configurable
    if not c.get("transforms"):
        c.pop("transforms", None)
    return hashlib.sha1(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:8]
