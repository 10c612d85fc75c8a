"""The model-transform chain: adapters, pruning and quantisation are links of one ordered chain.

A link is a :class:`ModelTransform`. It declares its ``stage`` (``before_fit``: on the freshly built backbone,
before the method exists, as adapters do; ``after_fit``: on the trained model, with calibration data, as
compression does) and its ``scope`` (``backbone`` or the whole ``model``). :meth:`ModelTransform.transform`
changes the target in place and returns its *state*: whatever it computed that the config alone does not
determine (pruning masks, kept channels, quantisation scales; tensors are fine). The chain keeps one record per
link, ``{"config", "stage", "state"}``, and checkpoints store the records (``dgkit_meta["chain"]``).

On reload, :func:`replay_chain` rebuilds every link from its config and calls :meth:`ModelTransform.replay` with
the recorded state, with no data: the rebuilt model has the transformed structure, so the checkpoint's
weights fit it. The config lists the chain as ``transforms: [...]`` (each entry a ``_target_`` config);
``adapter=`` stays the user-facing shorthand for the first link.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import pytorch_lightning as pl
from hydra.utils import instantiate
from torch import nn

from dgkit.search import without_search

STAGES = ("before_fit", "after_fit")
SCOPES = ("backbone", "model")


@dataclass
class TransformContext:
    """What a link may use when it is applied.

    Attributes:
        stage: ``before_fit`` or ``after_fit``.
        datamodule: the run's data (``after_fit``: calibration must read only its source domains unless the
            link's config allows otherwise); ``None`` when replaying or when no data exists.
        replay: true when the chain is being rebuilt from a checkpoint (no data, weights loaded afterwards).
    """

    stage: str
    datamodule: Any = None
    replay: bool = False


class ModelTransform:
    """One link of the chain (see the module docstring). Subclasses implement :meth:`transform`."""

    stage: ClassVar[str] = "before_fit"
    scope: ClassVar[str] = "backbone"

    def transform(self, model: nn.Module, context: TransformContext) -> dict[str, Any]:
        """Change ``model`` in place; return the state a data-free replay needs (``{}`` when the config says
        everything)."""
        raise NotImplementedError

    def replay(self, model: nn.Module, state: dict[str, Any]) -> None:
        """Rebuild the transformed structure on a fresh ``model`` from a recorded ``state`` (no data).

        The default re-applies the link, which is right for links whose structure the config determines
        (adapters); links that computed their structure from data override it.
        """
        self.transform(model, TransformContext(stage=self.stage, replay=True))

    def callbacks(self) -> list[pl.Callback]:
        """Training callbacks the link needs (e.g. SoMA's annealed weight decay)."""
        return []

    def step_budget_dependence(self) -> list[str]:
        """What in this link depends on ``trainer.max_steps`` (e.g. a schedule over the run); empty: nothing."""
        return []


def chain_configs(cfg: Any) -> list[dict[str, Any]]:
    """The chain's link configs in order: ``adapter`` (when set) then ``transforms``."""
    links = []
    if cfg.get("adapter"):
        links.append(cfg.adapter)
    links += list(cfg.get("transforms") or [])
    return [without_search(c) for c in links]  # a search space is not an argument


def _link(config: dict[str, Any]) -> ModelTransform:
    link = instantiate(config)
    if not isinstance(link, ModelTransform):
        raise TypeError(f"{config.get('_target_')} is not a dgkit.chain.ModelTransform; it cannot be a chain link")
    if link.stage not in STAGES or link.scope not in SCOPES:
        raise ValueError(
            f"{type(link).__name__}: stage {link.stage!r} / scope {link.scope!r}; valid: {STAGES}, {SCOPES}"
        )
    if link.stage == "before_fit" and link.scope != "backbone":
        raise ValueError(f"{type(link).__name__}: a before_fit link can only transform the backbone (no model yet)")
    return link


def _target(model: nn.Module, link: ModelTransform) -> nn.Module:
    """The module a link acts on: the whole model, or its ``backbone`` (a bare backbone is its own)."""
    if link.scope == "model":
        return model
    return getattr(model, "backbone", model)


def apply_chain(
    configs: Sequence[dict[str, Any]], model: nn.Module, context: TransformContext
) -> tuple[list[dict[str, Any]], list[pl.Callback]]:
    """Apply the links of ``context.stage`` in order; return their records and the callbacks they ask for.

    Args:
        configs: every link's config (:func:`chain_configs`); links of the other stage are skipped.
        model: the backbone (``before_fit``) or the method (``after_fit``).
    """
    records, callbacks = [], []
    for config in configs:
        link = _link(config)
        if link.stage != context.stage:
            continue
        state = link.transform(_target(model, link), context)
        records.append({"config": config, "stage": link.stage, "state": state or {}})
        callbacks += link.callbacks()
    return records, callbacks


def replay_chain(records: Sequence[dict[str, Any]], model: nn.Module, stage: str) -> None:
    """Replay the recorded links of ``stage`` on a freshly built ``model`` (before its weights are loaded)."""
    for record in records:
        if record["stage"] == stage:
            link = _link(record["config"])
            link.replay(_target(model, link), record.get("state") or {})


def chain_budget_dependence(configs: Sequence[dict[str, Any]]) -> list[str]:
    """Every link's :meth:`ModelTransform.step_budget_dependence`, in order."""
    return [reason for c in configs for reason in _link(c).step_budget_dependence()]


def chain_stages(configs: Sequence[dict[str, Any]]) -> list[str]:
    """The stage of each link, in order (instantiates them: configs are validated)."""
    return [_link(c).stage for c in configs]
