"""A trained backbone's weights as ``backbone.safetensors``, in the key space ``backbone.weights=PATH`` reads
(self-supervised pre-training exports it; supervised runs with ``export_backbone=true``)."""

from __future__ import annotations

import copy
from pathlib import Path

from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save as safetensors_bytes
from torch import nn

from dgkit.adapters import AdapterLinear, SplitQKV, merge
from dgkit.utils.io import atomic_write


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
