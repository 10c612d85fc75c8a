"""Row labels and algorithm choices of a run, derived from its Hydra config.

A result table has one row per ``tag``, and runs that share a tag are hyper-parameter candidates of one
algorithm (DomainBed's ``hparams_seed``). So the default tag must tell apart every choice that makes a different
algorithm, not only the method's class: ``ERM`` and ``ERM+BSS``, ``DANN`` and ``DANN-alt``, a probe of a random
backbone and a probe of an SSL one. :func:`default_tag` builds that label; :func:`algorithm_choices` records the
same choices in ``run.json`` so that result collection can warn when one row mixes algorithms
(:func:`dgkit.eval.mixed.mixed_rows`).

Both are pure functions of the config (resolved or not); the only file they read is the ``run.json`` beside a
``backbone.weights`` file, which names the run that exported it.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

RUN_FILE = "run.json"
FULL_FINE_TUNING = "FullFineTuning"
RANDOM_INIT = "random-init"
PRETRAINED = "pretrained"
UNKNOWN = "?"
_UNRESOLVED = object()
_VARIANT_ABBREVIATIONS = {"alternating": "alt"}
"""Short forms of variant names in tags (``DANN-alt``); a variant not listed appears as it is."""


def default_tag(cfg: DictConfig) -> str:
    """The result-table row label when ``tag`` is unset.

    The method's class name, ``-<variant>`` unless it is the method's default variant (``DANN-alt``), then
    ``+<AUGMENT>`` for every augmentation block with ``p > 0`` (``ERM+BSS``), then ``+<adapter class>`` unless
    the backbone is fully fine-tuned (``DANN+SoMA``, ``ERM+Freeze``), then ``+<class>`` for each further link of
    the transform chain (``transforms``: compression): e.g. ``DANN-alt+BSS+LoRA``. A linear probe
    is named after what it probes: ``Probe(random-init)``, ``Probe(<tag of the run that exported the
    weights>)``, ``Probe(<weights file stem>)`` or ``Probe(pretrained)`` (timm's weights).

    Args:
        cfg: the composed training config (``conf/train.yaml``), resolved or not.
    """
    cls = _method_class(cfg)
    label = _METHOD_LABELS.get(cls, _plain_method_label)(cfg, cls)
    variant = _variant(cfg)
    if variant is not None and variant != _default_variant(cfg):
        label += f"-{_VARIANT_ABBREVIATIONS.get(variant, variant)}"
    label += "".join(f"+{name.upper()}" for name in _active_augments(cfg))
    adapter = _adapter_class(cfg)
    if adapter != FULL_FINE_TUNING:
        label += f"+{adapter}"
    label += "".join(f"+{name}" for name in _transform_classes(cfg))
    return label


def algorithm_choices(cfg: DictConfig) -> dict[str, str]:
    """The config choices that define the algorithm, for ``run.json``'s ``choices``.

    Runs of one result row that differ in any of these are different algorithms. Keys: ``method`` (class,
    ``:<variant>`` where the method has one), ``adapter`` (class; ``FullFineTuning`` when absent), ``augment``
    (sorted names of the blocks with ``p > 0``, comma-separated, or ``none``), ``backbone`` (class,
    ``:<name>`` where it has one) and ``init`` (where the backbone's weights come from: ``random-init``,
    ``pretrained``, the tag of the run that exported them, or their file stem), ``task`` (the task's class) and
    ``transforms`` (the classes of the transform chain's links after the adapter, comma-separated, or ``none``).

    Args:
        cfg: the composed training config, resolved or not.
    """
    method = _method_class(cfg)
    variant = _variant(cfg)
    backbone = _class_name(_get(cfg, "backbone", "_target_")) or UNKNOWN
    name = _get(cfg, "backbone", "name")
    return {
        "method": f"{method}:{variant}" if variant is not None else method,
        "adapter": _adapter_class(cfg),
        "augment": ",".join(_active_augments(cfg)) or "none",
        "backbone": f"{backbone}:{name}" if name is not None else backbone,
        "init": weights_label(cfg) or UNKNOWN,
        "task": _class_name(_get(cfg, "task", "_target_")) or "Classification",
        "transforms": ",".join(_transform_classes(cfg)) or "none",
    }


def weights_label(cfg: DictConfig) -> str | None:
    """Where the backbone's initial weights come from, or ``None`` when unknown (``backbone.weights=???``).

    ``random-init`` (no weights), ``pretrained`` (timm's own weights), the ``tag`` in the ``run.json`` beside
    the weights file (an SSL run exports ``<run>/backbone.safetensors``), else the file's stem.

    Args:
        cfg: the composed training config, resolved or not.
    """
    backbone = cfg.get("backbone")
    if backbone is not None and ("weights" in backbone or OmegaConf.is_missing(backbone, "weights")):
        weights = _get(cfg, "backbone", "weights", default=_UNRESOLVED)
        if weights is _UNRESOLVED:  # ``???`` or an interpolation that cannot be resolved here
            return None
    else:
        weights = None  # a backbone config without the key builds with its default: no weights
    if not weights:
        return PRETRAINED if _get(cfg, "backbone", "pretrained") else RANDOM_INIT
    path = Path(str(weights)).expanduser()
    return _exporting_run_tag(path.parent / RUN_FILE) or path.stem


def _probe_label(cfg: DictConfig, cls: str) -> str:
    """``Probe(<what it probes>)``; the class name when the weights are not known yet."""
    source = weights_label(cfg)
    return f"Probe({source})" if source is not None else cls


def _plain_method_label(cfg: DictConfig, cls: str) -> str:
    """The method's class name."""
    return cls


# Methods whose label says more than their class name (a linear probe is only as good as what it probes).
_METHOD_LABELS: dict[str, Callable[[DictConfig, str], str]] = {"LinearProbe": _probe_label}


def _exporting_run_tag(run_json: Path) -> str | None:
    """The ``tag`` of the run whose ``run.json`` this is, or ``None`` when absent or unreadable."""
    try:
        tag = json.loads(run_json.read_text(encoding="utf-8")).get("tag")
    except (OSError, ValueError, AttributeError):
        return None
    return tag if isinstance(tag, str) and tag else None


def _method_class(cfg: DictConfig) -> str:
    """The last part of ``method._target_`` (``dgkit.methods.DANN`` -> ``DANN``)."""
    return _class_name(_get(cfg, "method", "_target_")) or UNKNOWN


def _adapter_class(cfg: DictConfig) -> str:
    """The adapter's class name; ``FullFineTuning`` without an adapter group (what it amounts to)."""
    return _class_name(_get(cfg, "adapter", "_target_")) or FULL_FINE_TUNING


def _transform_classes(cfg: DictConfig) -> list[str]:
    """Class names of the transform chain's links listed in ``transforms`` (after the adapter), in order."""
    links = _get(cfg, "transforms", default=None) or []
    return [_class_name(link.get("_target_")) or UNKNOWN for link in links]


def _variant(cfg: DictConfig) -> str | None:
    """``method.variant`` as a string, or ``None`` for methods without variants."""
    variant = _get(cfg, "method", "variant")
    return None if variant is None else str(variant)


def _default_variant(cfg: DictConfig) -> str | None:
    """The default of the method constructor's ``variant`` argument (the paper's), ``None`` if not found."""
    try:
        parameter = inspect.signature(get_class(str(_get(cfg, "method", "_target_")))).parameters.get("variant")
    except (ImportError, ValueError, TypeError):
        return None
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    return str(parameter.default)


def _active_augments(cfg: DictConfig) -> list[str]:
    """Sorted names of the ``augment`` blocks that act: present with ``p > 0`` (no ``p``: always on)."""
    augment = cfg.get("augment") or {}
    active = []
    for name in sorted(augment):
        p = _get(cfg, "augment", str(name), "p", default=1.0)
        if augment[name] is not None and (p is None or float(p) > 0):
            active.append(str(name))
    return active


def _get(cfg: DictConfig, *keys: str, default: Any = None) -> Any:
    """``cfg.<keys...>`` or ``default`` when a key is absent, missing (``???``) or cannot be resolved here
    (e.g. ``${hydra:...}`` outside a Hydra run)."""
    node: Any = cfg
    try:
        for key in keys:
            if not isinstance(node, DictConfig) or key not in node or OmegaConf.is_missing(node, key):
                return default
            node = node[key]
    except OmegaConfBaseException:
        return default
    return node


def _class_name(target: Any) -> str | None:
    """``a.b.Name`` -> ``Name``; ``None`` for no target."""
    return str(target).rsplit(".", 1)[-1] if target else None
