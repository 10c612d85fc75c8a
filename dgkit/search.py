"""Random hyper-parameter search, DomainBed's way (``hparams_seed``).

Each method, adapter and augmentation config declares its search space next to its defaults, in a ``search``
block of dotted keys relative to the block::

    search:                                   # conf/method/dann.yaml
      lambda_max: {dist: log_uniform, low: 0.01, high: 100}
      optimizer.lr: {dist: log_uniform, low: 1.0e-4, high: 3.16e-3}

``hparams_seed=0`` trains the defaults. ``hparams_seed=N`` draws every searched key from its distribution with
a generator seeded by a hash of ``(N, full key)``: adding a key to a space does not change the other keys'
draws, and a draw is the same in every held-out fold (so a candidate is one configuration across folds; model
selection then picks per fold, among that fold's candidates). The draws are written into the config before
anything is built (they join the hyper-parameter id) and recorded in ``run.json``. ``search`` blocks never
reach the objects the config builds (:func:`without_search`).

Distributions: ``uniform`` and ``log_uniform`` (``low``, ``high``), ``log2_int`` (``int(2**U(low, high))``,
DomainBed's batch sizes and widths) and ``choice`` (``values``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from dgkit.data.benchmark import seed_hash

SEARCHED_GROUPS = ("method", "adapter")
"""Config blocks that may declare a ``search`` space (plus every block under ``augment``)."""
DISTRIBUTIONS = ("uniform", "log_uniform", "log2_int", "choice")


def draw(spec: dict[str, Any], seed: int) -> Any:
    """One value of a search-space entry, from a generator seeded with ``seed``.

    Raises:
        ValueError: an unknown distribution or missing bounds, naming the valid ones.
    """
    dist = spec.get("dist")
    rng = np.random.RandomState(seed)
    if dist == "choice":
        values = list(spec["values"])
        return values[int(rng.randint(len(values)))]
    if dist not in DISTRIBUTIONS or "low" not in spec or "high" not in spec:
        raise ValueError(f"search space entry {spec}: dist must be one of {list(DISTRIBUTIONS)} (with low/high)")
    low, high = float(spec["low"]), float(spec["high"])
    if dist == "uniform":
        return float(rng.uniform(low, high))
    if dist == "log_uniform":
        return float(10 ** rng.uniform(math.log10(low), math.log10(high)))
    return int(2 ** rng.uniform(low, high))  # log2_int


def search_spaces(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """``{full dotted key: spec}`` of every ``search`` block in the config."""
    blocks = [(g, cfg.get(g)) for g in SEARCHED_GROUPS] + [
        (f"augment.{name}", block) for name, block in (cfg.get("augment") or {}).items()
    ]
    spaces = {}
    for prefix, block in blocks:
        if isinstance(block, DictConfig) and block.get("search"):
            for key, spec in OmegaConf.to_container(block.search, resolve=True).items():
                spaces[f"{prefix}.{key}"] = spec
    return spaces


def apply_hparams_seed(cfg: DictConfig) -> dict[str, Any]:
    """Write the draws of ``cfg.hparams_seed`` into ``cfg`` (in place) and return them (``{}`` for seed 0).

    Raises:
        ValueError: a negative seed, or a searched key the config does not have.
    """
    n = int(cfg.get("hparams_seed") or 0)
    if n < 0:
        raise ValueError(f"hparams_seed={n} must be >= 0 (0: the defaults)")
    if n == 0:
        return {}
    draws = {}
    for key, spec in sorted(search_spaces(cfg).items()):
        if OmegaConf.select(cfg, key, default="__absent__") == "__absent__":
            raise ValueError(f"search space key {key!r} is not in the config (a typo in its search block?)")
        draws[key] = draw(spec, seed_hash(n, key))
        with open_dict(cfg):
            OmegaConf.update(cfg, key, draws[key])
    return draws


def without_search(block: Any) -> Any:
    """A config block as a plain container without its ``search`` space (what is instantiated)."""
    plain = OmegaConf.to_container(block, resolve=True) if OmegaConf.is_config(block) else dict(block)
    plain.pop("search", None)
    return plain
