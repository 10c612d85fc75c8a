"""Random hyper-parameter search, DomainBed's way (``hparams_seed``).

Each method, adapter, augmentation and test-time adaptation config declares its search space next to its
defaults, in a ``search`` block of dotted keys relative to the block (draws are keyed ``method.<key>``,
``adapter.<key>``, ``augment.<name>.<key>``, ``tta.<key>``)::

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
DomainBed's batch sizes and widths) and ``choice`` (``values``). Every search block is checked before a run,
``hparams_seed=0`` included (:func:`check_spaces`): an unknown distribution, bad bounds, or a key the block's
``_target_`` does not take is an error that names the key, not a silent default.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from dgkit.data.benchmark import seed_hash

SEARCHED_GROUPS = ("method", "adapter", "tta")
"""Config blocks that may declare a ``search`` space (plus every block under ``augment``). A ``tta`` draw changes
only the test-time adaptation of the selected checkpoint, never training: the TTA is left out of the
hyper-parameter id, like every ``tta`` key."""
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


def check_spec(key: str, spec: Any) -> None:
    """Refuse a malformed search-space entry, naming ``key``.

    Raises:
        ValueError: not a mapping, an unknown distribution, missing or inverted bounds, non-positive
            ``log_uniform`` bounds, or a ``choice`` without values.
    """
    if not isinstance(spec, dict):
        raise ValueError(f"search space {key!r}: {spec!r} is not a mapping like {{dist: uniform, low: 0, high: 1}}")
    dist = spec.get("dist")
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"search space {key!r}: dist {dist!r} must be one of {list(DISTRIBUTIONS)}")
    if dist == "choice":
        if not isinstance(spec.get("values"), list) or not spec["values"]:
            raise ValueError(f"search space {key!r}: dist choice needs a non-empty list of values")
        return
    try:
        low, high = float(spec["low"]), float(spec["high"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"search space {key!r}: dist {dist} needs numeric low and high, got {spec}") from None
    if low > high:
        raise ValueError(f"search space {key!r}: low {low} > high {high}")
    if dist == "log_uniform" and low <= 0:
        raise ValueError(f"search space {key!r}: log_uniform needs low > 0, got {low}")


def _arguments(block: DictConfig) -> list[str] | None:
    """The keyword arguments of the block's ``_target_``; ``None`` when unknown (no target, or ``**kwargs``)."""
    target = block.get("_target_")
    if not isinstance(target, str):
        return None
    try:
        from hydra.utils import get_object

        params = inspect.signature(get_object(target)).parameters.values()
    except Exception:  # noqa: BLE001 - an unimportable target is reported when the config is instantiated
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.name != "self"]


def check_spaces(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Every search space of ``cfg``, checked (:func:`check_spec`; each key in its block and taken by its target).

    Raises:
        ValueError: a malformed entry, or a searched key the config or its block's ``_target_`` does not have.
    """
    spaces = search_spaces(cfg)
    for key, spec in sorted(spaces.items()):
        check_spec(key, spec)
        prefix = _block_prefix(cfg, key)
        block = OmegaConf.select(cfg, prefix)
        name = key[len(prefix) + 1 :].split(".")[0]
        takes = _arguments(block)
        hint = f"; {block.get('_target_')} takes: {', '.join(takes)}" if takes is not None else ""
        if name in ("_target_", "search") or OmegaConf.select(cfg, key, default="__absent__") == "__absent__":
            raise ValueError(f"search space key {key!r} is not in the config (a typo in its search block?){hint}")
        if takes is not None and name not in takes:
            raise ValueError(f"search space key {key!r}: {block.get('_target_')} takes no {name!r}{hint}")
    return spaces


def _block_prefix(cfg: DictConfig, key: str) -> str:
    """The block (``method``, ``adapter``, ``augment.<name>``) a full search key belongs to."""
    return ".".join(key.split(".")[:2]) if key.startswith("augment.") else key.split(".")[0]


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
        ValueError: a negative seed, or an invalid search space (:func:`check_spaces`, checked for seed 0 too).
    """
    n = int(cfg.get("hparams_seed") or 0)
    if n < 0:
        raise ValueError(f"hparams_seed={n} must be >= 0 (0: the defaults)")
    spaces = check_spaces(cfg)
    if n == 0:
        return {}
    draws = {}
    for key, spec in sorted(spaces.items()):
        draws[key] = draw(spec, seed_hash(n, key))
        with open_dict(cfg):
            OmegaConf.update(cfg, key, draws[key])
    return draws


def without_search(block: Any) -> Any:
    """A config block as a plain container without its ``search`` space (what is instantiated)."""
    plain = OmegaConf.to_container(block, resolve=True) if OmegaConf.is_config(block) else dict(block)
    plain.pop("search", None)
    return plain
