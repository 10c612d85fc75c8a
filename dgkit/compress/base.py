"""What every compression link shares: the ``after_fit`` stage, the layers it may touch, calibration, a report.

A compression link is a :class:`~dgkit.chain.ModelTransform` of stage ``after_fit`` and scope ``model``: it acts
on the trained method (or on an inference model), on the layers of its ``backbone`` and ``classifier`` only, so
training-only parts (DANN's discriminator, projectors) are never touched. It first folds any adapter into plain
layers (:func:`dgkit.adapters.core.merge`): calibration and quantisation must see the final weights. The same
merge runs when the chain is replayed, so a compressed checkpoint reloads.

Layer lists (``include``/``exclude``) hold patterns: a dotted name part (``patch_embed``, ``attn.qkv``) or a
glob (``backbone.model.blocks.*.mlp.fc2``). A pattern that matches no layer is an error naming close matches.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Sequence
from typing import Any, ClassVar

from torch import nn

from dgkit.adapters.core import merge
from dgkit.chain import ModelTransform, TransformContext
from dgkit.compress.calibration import Calibration, calibration_data

SCOPE_PREFIXES = ("backbone", "classifier", "head")
DEFAULT_EXCLUDE = ("classifier", "head", "patch_embed")


def matches(name: str, pattern: str) -> bool:
    """Whether a dotted module ``name`` is selected by ``pattern`` (a glob, or a run of whole name parts)."""
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return re.search(rf"(^|\.){re.escape(pattern)}(\.|$)", name) is not None


def check_patterns(patterns: Sequence[str], names: Sequence[str], what: str) -> None:
    """Raise when a pattern of ``patterns`` selects none of ``names``, listing close matches.

    Raises:
        ValueError: naming the pattern, ``what`` list it came from, and up to five close layer names.
    """
    for pattern in patterns:
        if not any(matches(n, pattern) for n in names):
            close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.3)
            parts = sorted({part for n in names for part in n.split(".") if not part.isdigit()})
            close = close or difflib.get_close_matches(pattern, parts, n=5, cutoff=0.3)
            raise ValueError(
                f"compress {what}: {pattern!r} matches no layer. Close matches: {close or 'none'}. "
                f"Patterns are dotted name parts (e.g. attn.qkv) or globs over names such as {names[:3]}"
            )


def select_layers(
    model: nn.Module,
    types: tuple[type, ...],
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    default_exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> list[str]:
    """Names of ``model``'s layers of ``types`` under its backbone and head that ``include`` (all when ``None``)
    selects and neither ``exclude`` nor ``default_exclude`` removes.

    User patterns (``include``, ``exclude``) that match no layer of the model raise (:func:`check_patterns`);
    ``default_exclude`` patterns are allowed to match nothing (a CNN has no ``patch_embed``).
    """
    everything = [n for n, _ in model.named_modules() if n]
    in_scope = [n for n in everything if n.split(".")[0] in SCOPE_PREFIXES or getattr(model, "backbone", None) is None]
    candidates = [n for n in in_scope if isinstance(model.get_submodule(n), types)]
    check_patterns(list(include or []), candidates, "include")
    check_patterns(list(exclude), everything, "exclude")
    chosen = [n for n in candidates if include is None or any(matches(n, p) for p in include)]
    removed = [*exclude, *default_exclude]
    return [n for n in chosen if not any(matches(n, p) for p in removed)]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted) by ``module``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


class CompressionTransform(ModelTransform):
    """Base of the compression links: ``after_fit`` on the whole model, adapters merged first, calibration from
    the source domains (:mod:`dgkit.compress.calibration`).

    Args:
        calibration: ``images_per_domain`` (default 64), ``allow_target`` (default false: held-out domains are
            never read), ``seed``.
        include: layer patterns to compress (``None``: every layer of the kind the link handles).
        exclude: layer patterns to leave alone, on top of ``default_exclude``.
        default_exclude: left alone unless removed from this list: the head and the patch embedding.
        name: the variant's name (its folder under ``variants/`` and its table label); ``None``: the config's
            ``compress`` choice.
    """

    stage: ClassVar[str] = "after_fit"
    scope: ClassVar[str] = "model"
    layer_types: ClassVar[tuple[type, ...]] = (nn.Linear,)

    def __init__(self, calibration: dict[str, Any] | None = None, include: Sequence[str] | None = None,
                 exclude: Sequence[str] = (), default_exclude: Sequence[str] = DEFAULT_EXCLUDE,
                 name: str | None = None) -> None:  # fmt: skip
        self.name = name
        calibration = dict(calibration or {})
        self.images_per_domain = int(calibration.get("images_per_domain", 64))
        self.allow_target = bool(calibration.get("allow_target", False))
        self.calibration_seed = int(calibration.get("seed", 0))
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude)
        self.default_exclude = list(default_exclude)

    def layers(self, model: nn.Module) -> list[str]:
        """The layers this link compresses (see :func:`select_layers`).

        Raises:
            ValueError: none is selected (e.g. a linear-only quantiser on a CNN whose only linear is its head).
        """
        names = select_layers(model, self.layer_types, self.include, self.exclude, self.default_exclude)
        if not names:
            hint = "" if nn.Conv2d in self.layer_types else "; a convolutional backbone is quantised by compress=int8"
            kinds = "/".join(t.__name__ for t in self.layer_types)
            raise ValueError(
                f"{type(self).__name__}: no {kinds} layer left to compress in {type(model).__name__} after "
                f"exclude={[*self.exclude, *self.default_exclude]}"
                f"{hint}"
            )
        return names

    def calibrate(self, context: TransformContext) -> Calibration:
        """The calibration images (source domains only unless ``allow_target``)."""
        return calibration_data(context.datamodule, self.images_per_domain, self.allow_target, self.calibration_seed)

    @staticmethod
    def prepare(model: nn.Module) -> nn.Module:
        """Fold adapters into plain layers (in place); the same on transform and on replay."""
        backbone = getattr(model, "backbone", None)
        merge(backbone if backbone is not None else model)
        return model
