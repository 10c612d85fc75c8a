"""Loading pretrained weights from a local file (no network): timm ``.pth``/``.bin``/``.safetensors``.

The checkpoint may be a bare state dict or wrap one under ``state_dict``/``model``/``module``; a
``module.`` prefix (DDP) is stripped. Classifier-head keys are dropped (backbones are built without a
head). Where the model's timm module defines ``checkpoint_filter_fn`` it is applied, so e.g. a ViT's
position embeddings are resampled to the configured image size, as timm does for its own downloads.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

_WRAPPER_KEYS = ("state_dict", "model", "module", "backbone")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``path`` (safetensors or torch pickle of tensors only)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"backbone.weights: no file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path), device="cpu")
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise ValueError(f"backbone.weights: cannot read {path} as a PyTorch state dict: {e}") from e
    for key in _WRAPPER_KEYS:
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"backbone.weights: {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_weights(model: nn.Module, path: str | Path, head_prefixes: tuple[str, ...] = ()) -> None:
    """Load a local checkpoint into ``model``; raise listing missing and unexpected keys on mismatch.

    Args:
        model: the (timm or dgkit) module to load into.
        path: a ``.pth``, ``.bin``, ``.pt`` or ``.safetensors`` file.
        head_prefixes: key prefixes of a classifier head to drop when the model has none.
    """
    sd = read_state_dict(path)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        sd = filter_fn(sd, model)
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if k in own or not k.startswith(tuple(p + "." for p in head_prefixes))}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = sorted(k for k in set(sd) & set(own) if sd[k].shape != own[k].shape)
    if missing or unexpected or mismatched:
        lines = [f"backbone.weights={path} does not fit {type(model).__name__}:"]
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", mismatched)):
            if keys:
                shown = ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")
                lines.append(f"  {label}: {shown}")
        lines.append("Check that backbone.name matches the architecture the file was saved from.")
        raise ValueError("\n".join(lines))
    model.load_state_dict(sd, strict=True)
