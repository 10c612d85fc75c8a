"""timm models as dgkit backbones (built with ``num_classes=0``: the head belongs to the method).

``forward_intermediates`` and ``feature_info`` are timm's own (timm 1.0 implements them for ResNets, ViTs and most
other families). ``stages()`` knows the timm architectures listed in ``_STAGE_SPLITS``: ResNets (the
``conv1/bn1/act1/maxpool`` stem, then ``layer1``..``layer4``) and ViTs (the token embedding as stem, each
transformer block a stage, the final norm joined to the last one); any other timm model raises
:class:`~dgkit.backbones.base.StagesNotSupported`.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from huggingface_hub import constants as hf_constants
from timm.models import ResNet, VisionTransformer
from torch import nn

from dgkit.backbones.base import Backbone, DataConfig, Intermediates, Stages, StagesNotSupported
from dgkit.backbones.weights import load_weights
from dgkit.errors import UserError


class _ViTStem(nn.Module):
    """A timm VisionTransformer's token embedding: patches, position embedding (+ class token), pre-norm."""

    def __init__(self, model: VisionTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, N, C)``."""
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))


def _resnet_split(model: ResNet) -> tuple[nn.Module, list[nn.Module]]:
    return nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool), [
        model.layer1, model.layer2, model.layer3, model.layer4
    ]  # fmt: skip


def _vit_split(model: VisionTransformer) -> tuple[nn.Module, list[nn.Module]]:
    blocks = list(model.blocks)
    return _ViTStem(model), [*blocks[:-1], nn.Sequential(blocks[-1], model.norm)]


# How each timm architecture (and its subclasses) splits into (stem, stages): declared, not guessed from attributes.
_STAGE_SPLITS: dict[type[nn.Module], Callable[[Any], tuple[nn.Module, list[nn.Module]]]] = {
    ResNet: _resnet_split,
    VisionTransformer: _vit_split,
}


class PretrainedWeightsUnavailable(UserError):
    """``backbone.pretrained=true`` without the weights: no network and not in the local cache."""


def _unreachable(endpoint: str, timeout: float = 3.0) -> str | None:
    """Why the host of ``endpoint`` cannot be reached (name resolution or a TCP connection), or ``None``."""
    host = urlparse(endpoint).hostname or endpoint
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as e:
        return f"{host} cannot be reached: {e}"
    return None


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Make the Hugging Face hub client read its local cache only, for the ``with`` block."""
    before = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = before or offline
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = before


class TimmBackbone(Backbone):
    """Any timm model by name.

    Args:
        name: timm model name (``resnet50``, ``vit_small_patch16_224``, ``test_vit``...).
        pretrained: download timm's own weights (needs a network; offline, pass ``weights``).
        weights: path to a local ``.pth``/``.bin``/``.safetensors`` checkpoint to load.
        input_size: side of the square input for the data pipeline; ``None`` = timm's default.
        model_kwargs: extra arguments for ``timm.create_model`` (``img_size``, ``patch_size``, ``depth``...).
        freeze_bn: keep BatchNorm layers in eval mode while training (DomainBed's ResNet setting: small
            per-domain batches give poor batch statistics).
    """

    def __init__(
        self,
        name: str = "resnet18",
        pretrained: bool = False,
        weights: str | None = None,
        input_size: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
        freeze_bn: bool = False,
    ) -> None:
        super().__init__()
        if pretrained and weights:
            raise ValueError("set either backbone.pretrained=true or backbone.weights=PATH, not both")
        kwargs = dict(model_kwargs or {})
        if not timm.is_model(name):  # accepts pretrained tags too (resnet50.tv_in1k)
            close = timm.list_models(f"*{name.split('_')[0]}*")[:15]
            raise ValueError(f"backbone.name={name!r} is not a timm model; similar names: {close}")
        self.model = self._create(name, pretrained, kwargs)
        if weights:
            head = self.model.pretrained_cfg.get("classifier", "head")
            heads = tuple(head) if isinstance(head, list | tuple) else (head,)
            load_weights(self.model, Path(weights), head_prefixes=heads)
        self.freeze_bn = freeze_bn
        self.num_features = int(self.model.num_features)
        cfg = timm.data.resolve_model_data_config(self.model)
        side = input_size or kwargs.get("img_size")
        size = (int(side), int(side)) if side else tuple(cfg["input_size"][1:])
        self.data_config = DataConfig(
            input_size=size, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), interpolation=cfg["interpolation"]
        )

    @staticmethod
    def _create(name: str, pretrained: bool, kwargs: dict[str, Any]) -> torch.nn.Module:
        if not pretrained:
            return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        # Offline, the hub client retries for about 50 s before failing: when its host cannot be reached, ask it
        # for the local cache only (weights downloaded earlier still load; others fail at once).
        unreachable = _unreachable(hf_constants.ENDPOINT)
        try:
            with _hub_offline(unreachable is not None):
                return timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
        except Exception as e:  # noqa: BLE001 (hub, HTTP and file errors all mean: no weights)
            why = f"{unreachable}; not in the local cache either" if unreachable else f"{type(e).__name__}: {e}"
            raise PretrainedWeightsUnavailable(
                f"backbone.pretrained=true could not fetch timm weights for {name!r} ({why}). "
                "Without a network, download the weights elsewhere and pass backbone.weights=/path/to/file "
                "(.pth, .bin or .safetensors) with backbone.pretrained=false."
            ) from e

    def train(self, mode: bool = True) -> TimmBackbone:
        """Switch train/eval mode; BatchNorm stays in eval mode when ``freeze_bn``."""
        super().train(mode)
        if mode and self.freeze_bn:
            for m in self.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """timm's unpooled features (``(B, C, H, W)`` or ``(B, N, C)``)."""
        return self.model.forward_features(x)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """timm's own pooling (global average, class token...) to ``(B, num_features)``."""
        return self.model.forward_head(features, pre_logits=True)

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """timm's ``feature_info``: one ``{"num_chs", "reduction", "module"}`` per intermediate."""
        return list(self.model.feature_info)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Intermediates:
        """timm's own ``forward_intermediates`` (see :meth:`Backbone.forward_intermediates`).

        A ResNet gives 5 intermediates (the stem's ``act1``, then ``layer1``..``layer4``), a ViT one per block
        (spatial tokens only, as ``(B, C, H, W)`` for ``NCHW``); ``feature_info`` lists them.
        """
        return self.model.forward_intermediates(
            x,
            indices=indices,
            norm=norm,
            stop_early=stop_early,
            output_fmt=output_fmt,
            intermediates_only=intermediates_only,
        )

    def stages(self) -> Stages:
        """The timm model as ``stem -> stages -> timm's pooling``, for the architectures in ``_STAGE_SPLITS``."""
        for cls in type(self.model).__mro__:  # the model's class or the nearest registered base class
            split = _STAGE_SPLITS.get(cls)
            if split is not None:
                stem, stages = split(self.model)
                return Stages(stem, stages, self.pool)
        name = self.model.pretrained_cfg.get("architecture", "?")
        raise StagesNotSupported(f"timm {name} ({type(self.model).__name__})")
