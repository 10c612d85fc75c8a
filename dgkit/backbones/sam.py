"""Segment Anything's ViT image encoder (Kirillov et al., ICCV 2023, arXiv 2304.02643) as a dgkit backbone.

Built from ``segment_anything.modeling`` (``ImageEncoderViT``, and with ``prompt_decoder=true`` its
``PromptEncoder`` and ``MaskDecoder``) at any ``img_size`` divisible by the patch size, as
``segment_anything/build_sam.py::_build_sam`` assembles them at 1024 px. The module names are the official
checkpoint's (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``), so ``backbone.weights=PATH`` loads
``sam_vit_b_01ec64.pth`` (read with ``map_location="cpu"``, ``weights_only=True``; never through
``build_sam``'s bare ``torch.load``). When the file was written at another size, :func:`resize_sam_state_dict`
resamples the absolute position embedding (bicubic, ``(1, G, G, C) -> (1, g, g, C)``) and the relative
position tables of the global-attention blocks (linear, ``(2G-1, d) -> (2g-1, d)``); windowed blocks keep
theirs (their size is ``2 * window - 1`` at every image size).

Surface: ``forward_features`` is SAM's image embedding (the neck's output ``(B, out_chans, g, g)``, g = img/16),
``forward`` its spatial mean, and ``forward_intermediates`` gives one map per encoder block: the block's
output through the same neck (``intermediates="neck"``, MapSAM's SPGen input) or the raw block output
(``"block"``), both ``(B, C, g, g)`` with reduction 16. See ``docs/segmentation.md`` for the sizes that fit
the attention windows.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn

from dgkit.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone, DataConfig, Intermediates
from dgkit.backbones.weights import read_state_dict

INTERMEDIATES = ("neck", "block")
NORMALIZATIONS = {"sam": (IMAGENET_MEAN, IMAGENET_STD), "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))}
_DECODER_PREFIXES = ("prompt_encoder.", "mask_decoder.")
# Decoder parts whose shape follows the number of mask outputs (not loaded when it differs: MapSAM's rule).
_MASK_OUTPUT_KEYS = re.compile(r"^mask_decoder\.(mask_tokens|output_hypernetworks_mlps|iou_prediction_head)\.")


def _resize_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """``(1, G, G, C)`` -> ``(1, grid, grid, C)``, bicubic (half-pixel centres), computed in float32."""
    x = pos.float().permute(0, 3, 1, 2)  # (1, C, G, G)
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).to(pos.dtype)


def _resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """``(L, d)`` -> ``(length, d)``, linear (half-pixel centres), as ``get_rel_pos`` resamples at run time."""
    x = table.float().T[None]  # (1, d, L)
    return F.interpolate(x, size=length, mode="linear", align_corners=False)[0].T.to(table.dtype)


def resize_sam_state_dict(
    sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor], global_blocks: Collection[int]
) -> dict[str, torch.Tensor]:
    """Resample ``image_encoder.pos_embed`` and the global blocks' ``rel_pos_h/_w`` of ``sd`` to ``own``'s shapes.

    Only those keys are resized, and only when their shapes differ: any other mismatch is left for the loader
    to report. A windowed block's table (``2 * window - 1`` rows) does not depend on the image size, so a
    mismatch there means another window size, which is reported too.

    Args:
        sd: the checkpoint's state dict.
        own: the model's state dict (target shapes).
        global_blocks: indices of the encoder blocks with global attention.
    """
    out = dict(sd)
    key = "image_encoder.pos_embed"
    if key in sd and key in own and sd[key].shape != own[key].shape and sd[key].shape[-1] == own[key].shape[-1]:
        out[key] = _resize_pos_embed(sd[key], own[key].shape[1])
    for k, v in sd.items():
        match = re.fullmatch(r"image_encoder\.blocks\.(\d+)\.attn\.rel_pos_[hw]", k)
        if match and int(match.group(1)) in global_blocks and k in own and v.shape != own[k].shape:
            if v.shape[1] == own[k].shape[1]:
                out[k] = _resize_rel_pos(v, own[k].shape[0])
    return out


class SAMBackbone(Backbone):
    """SAM's image encoder (optionally with its prompt encoder and mask decoder) as a dgkit backbone.

    Args:
        img_size: input side in pixels (a multiple of ``patch_size``); official checkpoints are 1024.
        embed_dim: encoder width (vit_b 768, vit_l 1024, vit_h 1280).
        depth: number of encoder blocks (12, 24, 32).
        num_heads: attention heads (12, 16, 16).
        global_attn_indexes: the blocks with global attention; the others attend within windows.
        window_size: the window side, in tokens (14 officially).
        patch_size: patch side in pixels (16).
        out_chans: channels of the neck's output, the image embedding (256; also the decoder's width).
        weights: a local SAM checkpoint (``.pth`` as released, or ``.safetensors``); resized to ``img_size``.
        prompt_decoder: also build SAM's ``PromptEncoder`` and ``MaskDecoder`` (MapSAM needs them).
        multimask_outputs: the decoder's extra mask outputs (SAM: 3; MapSAM: 0, one mask token). When it
            differs from the checkpoint's, the mask tokens, hypernetwork MLPs and IoU head are not loaded.
        decoder_mlp_dim: the two-way transformer's MLP width (2048).
        decoder_heads: its attention heads (8).
        intermediates: what ``forward_intermediates`` gives per block: ``neck`` (the block's output through the
            neck, ``out_chans`` channels, MapSAM's SPGen input) or ``block`` (the raw output, ``embed_dim``).
        normalization: ``sam`` (SAM's pixel mean/std, which are ImageNet's) or ``unit`` (image / 255, MapSAM).
    """

    def __init__(
        self,
        img_size: int = 1024,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
        window_size: int = 14,
        patch_size: int = 16,
        out_chans: int = 256,
        weights: str | None = None,
        prompt_decoder: bool = False,
        multimask_outputs: int = 3,
        decoder_mlp_dim: int = 2048,
        decoder_heads: int = 8,
        intermediates: str = "neck",
        normalization: str = "sam",
    ) -> None:
        super().__init__()
        if img_size < patch_size or img_size % patch_size:
            raise ValueError(f"backbone.img_size={img_size}: must be a positive multiple of patch_size={patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"backbone.embed_dim={embed_dim} is not divisible by backbone.num_heads={num_heads}")
        bad = [i for i in global_attn_indexes if not 0 <= i < depth]
        if bad:
            raise ValueError(f"backbone.global_attn_indexes={list(global_attn_indexes)}: {bad} not in 0..{depth - 1}")
        if window_size < 1:
            raise ValueError(f"backbone.window_size={window_size}: must be >= 1")
        if intermediates not in INTERMEDIATES:
            raise ValueError(f"backbone.intermediates={intermediates!r}; valid: {list(INTERMEDIATES)}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"backbone.normalization={normalization!r}; valid: {list(NORMALIZATIONS)}")
        self.img_size, self.patch_size, self.grid = int(img_size), int(patch_size), int(img_size) // int(patch_size)
        self.image_encoder = ImageEncoderViT(
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=4,
            out_chans=out_chans,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=window_size,
            global_attn_indexes=tuple(global_attn_indexes),
        )
        self.multimask_outputs = int(multimask_outputs)
        self._prompt_decoder = bool(prompt_decoder)
        if prompt_decoder:
            self.prompt_encoder = PromptEncoder(
                embed_dim=out_chans,
                image_embedding_size=(self.grid, self.grid),
                input_image_size=(img_size, img_size),
                mask_in_chans=16,
            )
            transformer = TwoWayTransformer(
                depth=2, embedding_dim=out_chans, mlp_dim=decoder_mlp_dim, num_heads=decoder_heads
            )
            self.mask_decoder = MaskDecoder(
                transformer_dim=out_chans,
                transformer=transformer,
                num_multimask_outputs=multimask_outputs,
                iou_head_depth=3,
                iou_head_hidden_dim=out_chans,
            )
        self.intermediates = intermediates
        self.num_features = int(out_chans)
        mean, std = NORMALIZATIONS[normalization]
        self.data_config = DataConfig(input_size=(self.img_size, self.img_size), mean=mean, std=std)
        chs = out_chans if intermediates == "neck" else embed_dim
        self._feature_info = [
            {"num_chs": int(chs), "reduction": self.patch_size, "module": f"image_encoder.blocks.{i}"}
            for i in range(depth)
        ]
        if weights:
            self.load_sam_weights(weights)

    @property
    def prompt_decoder(self) -> bool:
        """Whether SAM's ``prompt_encoder`` and ``mask_decoder`` are built (``prompt_decoder=true``)."""
        return self._prompt_decoder

    @property
    def decoder_prefixes(self) -> tuple[str, ...]:
        """``("prompt_encoder.", "mask_decoder.")`` when they are built (adapters leave them alone), else ``()``."""
        return _DECODER_PREFIXES if self._prompt_decoder else ()

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """One ``{"num_chs", "reduction", "module"}`` per encoder block (reduction = the patch size)."""
        return list(self._feature_info)

    def load_sam_weights(self, path: str | Path) -> None:
        """Load a SAM checkpoint, resizing the position tables to this ``img_size``; raise listing bad keys.

        Decoder keys are dropped when this backbone has no decoder; the mask-output parts are skipped when
        ``multimask_outputs`` differs from the file's (their shapes follow it).
        """
        sd = read_state_dict(path)
        own = self.state_dict()
        if not self.prompt_decoder:
            sd = {k: v for k, v in sd.items() if not k.startswith(_DECODER_PREFIXES)}
        global_blocks = [i for i, blk in enumerate(self.image_encoder.blocks) if blk.window_size == 0]
        sd = resize_sam_state_dict(sd, own, global_blocks)
        skipped = {
            k for k, v in sd.items() if _MASK_OUTPUT_KEYS.search(k) and (k not in own or own[k].shape != v.shape)
        }
        sd = {k: v for k, v in sd.items() if k not in skipped}
        missing = sorted(k for k in set(own) - set(sd) if not (skipped and _MASK_OUTPUT_KEYS.search(k)))
        unexpected = sorted(set(sd) - set(own))
        mismatched = sorted(k for k in set(sd) & set(own) if sd[k].shape != own[k].shape)
        if missing or unexpected or mismatched:
            lines = [f"backbone.weights={path} does not fit this SAM encoder (img_size={self.img_size}):"]
            for label, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatch", mismatched),
            ):
                if keys:
                    shown = ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")
                    lines.append(f"  {label}: {shown}")
            lines.append("Check that the backbone config (sam_vit_b/l/h) matches the file's model.")
            raise ValueError("\n".join(lines))
        self.load_state_dict(sd, strict=not skipped)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens plus the position embedding ``(B, g, g, C)``."""
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"SAM encoder built for {self.img_size} px inputs got {tuple(x.shape[-2:])}: set backbone.img_size "
                "or resize the images (data.image_size)"
            )
        enc = self.image_encoder
        h = enc.patch_embed(x)  # (B, g, g, C)
        return h + enc.pos_embed if enc.pos_embed is not None else h

    def neck(self, h: torch.Tensor) -> torch.Tensor:
        """SAM's neck on block tokens ``(B, g, g, C)`` -> ``(B, out_chans, g, g)``."""
        return self.image_encoder.neck(h.permute(0, 3, 1, 2))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """SAM's image embedding ``(B, out_chans, g, g)`` (what ``ImageEncoderViT.forward`` returns)."""
        h = self._tokens(x)
        for blk in self.image_encoder.blocks:
            h = blk(h)
        return self.neck(h)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """Spatial mean of the image embedding ``(B, out_chans)``."""
        return features.mean(dim=(2, 3))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Intermediates:
        """One map per block (``feature_info``): through the neck (``intermediates="neck"``) or raw.

        ``norm`` is accepted for timm's signature and has no effect: SAM's encoder has no final norm layer,
        its neck is the output projection and ``intermediates`` chooses whether the maps go through it.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"SAM intermediates are NCHW maps; output_fmt={output_fmt!r} is not supported")
        depth = len(self.image_encoder.blocks)
        wanted = _indices(indices, depth)
        last = max(wanted) if stop_early else depth - 1
        h, out = self._tokens(x), []
        for i, blk in enumerate(self.image_encoder.blocks[: last + 1]):
            h = blk(h)  # (B, g, g, C)
            if i in wanted:
                out.append(self.neck(h) if self.intermediates == "neck" else h.permute(0, 3, 1, 2))
        if intermediates_only:
            return out
        return self.neck(h), out


def _indices(indices: int | Sequence[int] | None, depth: int) -> list[int]:
    """Block positions from timm's ``indices`` (``n``: the last n; a sequence, negatives from the end; None: all)."""
    if indices is None:
        return list(range(depth))
    if isinstance(indices, int):
        if not 1 <= indices <= depth:
            raise ValueError(f"indices={indices}: the SAM encoder has {depth} blocks")
        return list(range(depth - indices, depth))
    out = sorted(i % depth for i in indices)
    if any(not -depth <= i < depth for i in indices):
        raise ValueError(f"indices={list(indices)}: the SAM encoder has {depth} blocks")
    return out
