"""Adapter specs: what ``conf/adapter/*.yaml`` instantiates; ``apply(backbone)`` transforms a built backbone.

Every spec is a ``before_fit`` link of the model-transform chain (:mod:`dgkit.chain`): the composition root
applies it after the backbone (and its ``backbone.weights``) is loaded and before the method is built, so every
objective sees an adapted backbone with only the adapter's parameters trainable; a checkpoint replays it (the
structure follows from the config) before its weights are loaded.
A spec subclass implements :meth:`Adapter.wrap` (one linear layer → its adapter wrapper); choosing layers
(``target``, ``start_block``, ``split_qkv``, ``qkv_slices``; never a backbone's built-in decoder), freezing and the
summary are shared here.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import pytorch_lightning as pl
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from dgkit.adapters.core import block_index, describe_linears, inject, mark_trainable, select_linears
from dgkit.adapters.qkv import SLICES, split_qkv
from dgkit.backbones.base import Backbone
from dgkit.chain import ModelTransform, TransformContext

log = logging.getLogger(__name__)

# Attention (fused qkv or its split parts, output projection) and MLP linears of timm ViTs and SAM encoders.
DEFAULT_TARGET = r"attn\.(qkv|proj)|mlp\.(fc|lin)[12]"


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts of ``model``."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def _summary(label: str, model: nn.Module, adapted: Sequence[str]) -> str:
    trainable, total = count_parameters(model)
    layers = f"{len(adapted)} adapted layers ({describe_linears(adapted)}); " if adapted else ""
    share = trainable / total
    return f"adapter {label}: {layers}{trainable:,} of {total:,} backbone parameters trainable ({share:.2%})"


class FullFineTuning(ModelTransform):
    """``adapter=none``: every backbone parameter trains (the backbone is left untouched)."""

    name = "none"

    def transform(self, model: nn.Module, context: TransformContext) -> dict[str, list[str]]:
        """The chain's entry point: :meth:`apply` to the backbone; the state records the adapted layer names."""
        return {"adapted": self.apply(model)}

    def apply(self, backbone: nn.Module) -> list[str]:
        """Log the summary; no layer is adapted."""
        self.summary = _summary("none (full fine-tuning)", backbone, [])
        log.info(self.summary)
        return []

    def callbacks(self) -> list[pl.Callback]:
        """No training callbacks."""
        return []


class Freeze(FullFineTuning):
    """``adapter=freeze``: the backbone is frozen (linear probe: only the method's head and extra parts train).

    Parameters only: normalisation layers stay in the method's train/eval mode (BatchNorm statistics of a CNN
    still update; set ``backbone.freeze_bn=true`` or use ``method=linear_probe`` to keep them).
    """

    name = "freeze"

    def apply(self, backbone: nn.Module) -> list[str]:
        """Freeze every backbone parameter and log the summary."""
        backbone.requires_grad_(False)
        self.summary = _summary("freeze (linear probe)", backbone, [])
        log.info(self.summary)
        return []


class Adapter(FullFineTuning):
    """Base of low-rank adapters on linear layers.

    Args:
        target: regex searched in each linear layer's qualified name (e.g. ``model.blocks.3.attn.qkv``; after
            ``split_qkv`` the parts are ``...attn.qkv.q``/``.k``/``.v``).
        rank: the update's rank ``r`` (at most ``min(in, out)`` of every adapted layer).
        start_block: adapt only blocks with index ``>= start_block`` (layers outside ``blocks.<i>.`` are kept
            when they match); ``null``: one third of the depth (SoMA's recipe).
        split_qkv: split fused ``qkv`` layers into ``q``, ``k``, ``v`` before adapting (merge fuses them back);
            ``false`` adapts the fused matrix.
        qkv_slices: with ``split_qkv``, which parts of a split ``qkv`` are adapted (``[q, v]``: PEGO, MapSAM).
        train_bias: make the adapted layers' biases trainable (SoMA: yes).
        trainable: extra regexes of backbone parameter names that train (e.g. ``norm``); the rest is frozen.
    """

    name = "adapter"

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        rank: int = 8,
        start_block: int | None = 0,
        split_qkv: bool = False,
        qkv_slices: Sequence[str] = SLICES,
        train_bias: bool = False,
        trainable: Sequence[str] = (),
    ) -> None:
        if rank < 1:
            raise ValueError(f"adapter.rank={rank}: must be >= 1")
        if start_block is not None and start_block < 0:
            raise ValueError(f"adapter.start_block={start_block}: must be >= 0 (or null for one third of the depth)")
        bad = [s for s in qkv_slices if s not in SLICES]
        if bad or not qkv_slices:
            raise ValueError(f"adapter.qkv_slices={list(qkv_slices)}: choose a non-empty subset of {list(SLICES)}")
        if not split_qkv and tuple(qkv_slices) != SLICES:
            raise ValueError("adapter.qkv_slices needs adapter.split_qkv=true (a fused qkv is adapted as a whole)")
        re.compile(target)
        self.target = target
        self.rank = int(rank)
        self.start_block = start_block
        self.split_qkv = bool(split_qkv)
        self.qkv_slices = tuple(qkv_slices)
        self.train_bias = bool(train_bias)
        self.trainable = list(trainable)

    def wrap(self, name: str, layer: nn.Linear) -> nn.Module:
        """The adapter wrapper of one linear layer."""
        raise NotImplementedError

    def check_rank(self, name: str, layer: nn.Linear) -> None:
        """Raise when the rank exceeds ``min(in, out)`` of ``layer``."""
        if self.rank > min(layer.in_features, layer.out_features):
            raise ValueError(
                f"adapter.rank={self.rank} exceeds min(in, out)={min(layer.in_features, layer.out_features)} "
                f"of {name} ({layer.out_features}x{layer.in_features}); choose adapter.rank <= that"
            )

    def select(self, backbone: nn.Module) -> list[str]:
        """The names of the linear layers to adapt: ``target`` matches at or after ``start_block``, never inside a
        built-in decoder (``Backbone.decoder_prefixes``: SAM's prompt encoder and mask decoder), whose training the
        method that uses it decides."""
        names = select_linears(backbone, self.target)
        decoder = backbone.decoder_prefixes if isinstance(backbone, Backbone) else ()
        if decoder:
            names = [n for n in names if not n.startswith(decoder)]
            if not names:
                raise ValueError(
                    f"adapter target {self.target!r} matches only layers of {type(backbone).__name__}'s decoder "
                    f"({', '.join(p.rstrip('.') for p in decoder)}), which adapters leave alone: target the encoder"
                )
        blocks = [b for b in (block_index(n) for n in names) if b is not None]
        start = self.start_block
        if start is None:
            start = (max(blocks) + 1) // 3 if blocks else 0
        names = [n for n in names if (block_index(n) is None or block_index(n) >= start)]
        if not names:
            raise ValueError(f"adapter.start_block={start} leaves no layer matching {self.target!r} to adapt")
        return names

    def apply(self, backbone: nn.Module) -> list[str]:
        """Freeze ``backbone``, swap the chosen layers for adapters, mark adapter (and declared) parameters
        trainable, log the summary; return the adapted names."""
        backbone.requires_grad_(False)
        names = self.select(backbone)
        if self.split_qkv:
            fused = [n for n in names if re.search(r"(^|\.)qkv$", n)]
            if fused:
                split_qkv(backbone, "^(" + "|".join(re.escape(n) for n in fused) + ")$")
            names = [p for n in names for p in ([f"{n}.{s}" for s in self.qkv_slices] if n in fused else [n])]
        exact = "^(" + "|".join(re.escape(n) for n in names) + ")$"
        inject(backbone, exact, self._checked_wrap)
        for name in names:
            module = backbone.get_submodule(name)
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module.base
            for pname, param in module.named_parameters():
                if not pname.startswith(("base.", "base_layer.")):
                    param.requires_grad_(True)
            if self.train_bias and base.bias is not None:
                base.bias.requires_grad_(True)
        mark_trainable(backbone, self.trainable)
        self.summary = _summary(self.name, backbone, names)
        log.info(self.summary)
        return names

    def _checked_wrap(self, name: str, layer: nn.Linear) -> nn.Module:
        self.check_rank(name, layer)
        return self.wrap(name, layer)
