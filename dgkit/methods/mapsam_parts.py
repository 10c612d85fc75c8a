"""MapSAM's parts (Xia et al., arXiv 2411.06971), on segment-anything's own modules: SPGen coarse-mask heads,
automatic point prompts, masked token-to-image attention with the positional-semantic prompt, focal + Dice loss.

:class:`dgkit.methods.mapsam.MapSAM` (``method=mapsam``) assembles them.

- :class:`SPGen`: a 1x1-conv head (C -> C/4 -> C/16 -> 1, LayerNorm2d and GELU between) on a neck-projected map;
  MapSAM averages 4 of them (final embedding and blocks 0, 4, 8) into the coarse mask ``C``.
- :func:`automatic_points`: ``C`` upsampled to the input; its top-k pixels become positive points, its bottom-k
  negative ones, as ``(x, y)`` input pixels (what ``PromptEncoder`` expects; it shifts them by 0.5 itself).
- :func:`attend`: SAM's decoder ``Attention`` with an optional key mask added to the logits before *one* softmax
  (Mask2Former style); rows whose keys are all masked fall back to unmasked attention. ``double_softmax=True``
  reproduces the official code (softmax, add -1e9, softmax again) for comparison only.
- :func:`decode`: ``MaskDecoder.predict_masks`` for one mask token and one prompt set per image (a batch of images
  in one call, equal to per-image calls), with the masks applied to the token-to-image attention of each two-way
  layer and the semantic prompt added to the query tokens before each layer and to the final attention's queries.
  With neither, it equals ``predict_masks`` image by image.
- :func:`mapsam_loss`: 0.2 focal (alpha 0.25, gamma 2) + 0.8 soft Dice (per sample) on the final and the coarse
  mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import nn


class SPGen(nn.Module):
    """A coarse-mask head: 1x1 conv ``C -> C/4``, LN2d, GELU, ``-> C/16``, LN2d, GELU, ``-> 1`` (256 -> 64 -> 16 -> 1).

    Args:
        channels: channels of the neck-projected map it reads.
    """

    def __init__(self, channels: int = 256) -> None:
        super().__init__()
        mid, low = max(channels // 4, 1), max(channels // 16, 1)
        self.layers = nn.Sequential(
            nn.Conv2d(channels, mid, 1), LayerNorm2d(mid), nn.GELU(),
            nn.Conv2d(mid, low, 1), LayerNorm2d(low), nn.GELU(),
            nn.Conv2d(low, 1, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Coarse logits ``(B, 1, h, w)`` from a map ``(B, C, h, w)``."""
        return self.layers(x)


def automatic_points(
    coarse: torch.Tensor, input_size: tuple[int, int], k: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Point prompts from a coarse mask: its ``k`` highest pixels positive, its ``k`` lowest negative.

    Args:
        coarse: coarse logits ``(B, 1, h, w)``; upsampled bilinearly to ``input_size`` first.
        input_size: ``(H, W)`` of the encoder's input.
        k: points per sign (MapSAM: 2).

    Returns:
        ``coords`` ``(B, 2k, 2)`` as ``(x, y)`` input pixels (float) and ``labels`` ``(B, 2k)`` (1 then 0).
    """
    up = F.interpolate(coarse.detach().float(), size=input_size, mode="bilinear", align_corners=False)[:, 0]
    flat = up.flatten(1)  # (B, H*W)
    idx = torch.cat([flat.topk(k, dim=1).indices, (-flat).topk(k, dim=1).indices], dim=1)  # (B, 2k)
    width = input_size[1]
    coords = torch.stack([idx % width, idx // width], dim=-1).float()  # (x, y) = (column, row)
    labels = torch.cat([torch.ones_like(idx[:, :k]), torch.zeros_like(idx[:, k:])], dim=1)
    return coords, labels


def attend(
    attn: nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor | None = None,
    double_softmax: bool = False,
) -> torch.Tensor:
    """segment-anything's decoder ``Attention.forward`` with an optional key mask.

    Args:
        attn: a ``segment_anything.modeling.transformer.Attention`` (its projections are used).
        q, k, v: ``(B, Nq, C)``, ``(B, Nk, C)``, ``(B, Nk, C)``.
        keep: bool ``(B, Nk)`` or ``(B, Nq, Nk)``: keys each query may attend to; ``None``: all.
        double_softmax: MapSAM's official computation, ``softmax(softmax(l) + M)`` with ``M = -1e9`` on masked
            keys and no fall-back (for comparison only).

    Returns:
        ``(B, Nq, C)``.
    """
    heads = attn.num_heads
    qh = attn._separate_heads(attn.q_proj(q), heads)  # (B, h, Nq, c)
    kh = attn._separate_heads(attn.k_proj(k), heads)  # (B, h, Nk, c)
    vh = attn._separate_heads(attn.v_proj(v), heads)
    logits = qh @ kh.transpose(-2, -1) / math.sqrt(qh.shape[-1])  # (B, h, Nq, Nk)
    if keep is None:
        probs = logits.softmax(-1)
    else:
        keep = keep.bool().detach()
        keep = keep[:, None, None, :] if keep.dim() == 2 else keep[:, None]  # (B, 1, Nq|1, Nk)
        if double_softmax:
            probs = (logits.softmax(-1) + (~keep).to(logits.dtype) * -1e9).softmax(-1)
        else:
            keep = keep | ~keep.any(-1, keepdim=True)  # a row with every key masked attends to all
            probs = logits.masked_fill(~keep, float("-inf")).softmax(-1)
    return attn.out_proj(attn._recombine_heads(probs @ vh))


def _two_way_layer(layer, queries, keys, query_pe, key_pe, keep, double_softmax):
    """``TwoWayAttentionBlock.forward`` with ``keep`` applied to its token-to-image attention only."""
    if layer.skip_first_layer_pe:
        queries = layer.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        queries = queries + layer.self_attn(q=q, k=q, v=queries)
    queries = layer.norm1(queries)
    q, k = queries + query_pe, keys + key_pe
    queries = layer.norm2(queries + attend(layer.cross_attn_token_to_image, q, k, keys, keep, double_softmax))
    queries = layer.norm3(queries + layer.mlp(queries))
    q, k = queries + query_pe, keys + key_pe
    keys = layer.norm4(keys + layer.cross_attn_image_to_token(q=k, k=q, v=queries))
    return queries, keys


def decode(
    decoder: nn.Module,
    image_embedding: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    first_keep: torch.Tensor | None = None,
    semantic: torch.Tensor | None = None,
    masked_attention: bool = False,
    double_softmax: bool = False,
) -> torch.Tensor:
    """The first mask token's logits ``(B, 1, 4h, 4w)`` from SAM's ``MaskDecoder``, one prompt set per image.

    SAM's ``MaskDecoder.predict_masks`` repeats *one* image embedding for every prompt row (so B images with B
    prompt sets fail or mix images); here image ``i`` meets only prompt set ``i``, every operation being per image
    (attention, norms and MLPs act on each row; the masks and the semantic prompt are per image), so a batch equals
    the images decoded one at a time.

    Args:
        decoder: a ``segment_anything.modeling.MaskDecoder``.
        image_embedding: ``(B, C, h, w)``.
        image_pe: the prompt encoder's dense positional encoding ``(1, C, h, w)`` (shared).
        sparse, dense: the prompt encoder's outputs ``(B, N, C)``, ``(B, C, h, w)``.
        first_keep: bool ``(B, h*w)``, the first layer's key mask (MapSAM: sigmoid(coarse) >= 0.5).
        semantic: ``(B, C)`` positional-semantic prompts (a zero row: none for that image), or ``None``.
        masked_attention: mask the token-to-image attention (layer 1 with ``first_keep``, later layers with the
            intermediate prediction ``sigmoid(LN_final(mask token) · (keys + pe)) >= 0.5``).
        double_softmax: see :func:`attend`.
    """
    t = decoder.transformer
    b, c, h, w = image_embedding.shape
    out_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)  # (T, C)
    tokens = torch.cat([out_tokens[None].expand(b, -1, -1), sparse], dim=1)  # (B, T + N, C)
    keys = (image_embedding + dense).flatten(2).transpose(1, 2)  # (B, h*w, C)
    key_pe = image_pe.flatten(2).transpose(1, 2)  # (1, h*w, C), broadcast over the batch
    queries, keep = tokens, first_keep if masked_attention else None
    extra = semantic[:, None] if semantic is not None else 0  # (B, 1, C)
    for i, layer in enumerate(t.layers):
        queries, keys = _two_way_layer(layer, queries + extra, keys, tokens, key_pe, keep, double_softmax)
        if masked_attention and i + 1 < len(t.layers):
            with torch.no_grad():  # the next layer's mask from the intermediate prediction (detached)
                token = t.norm_final_attn(queries[:, 1])  # (B, C): the mask token, MapSAM reuses this norm
                keep = torch.einsum("bc,bnc->bn", token, keys + key_pe).sigmoid() >= 0.5  # (B, h*w)
    q, k = queries + tokens + extra, keys + key_pe
    queries = t.norm_final_attn(queries + t.final_attn_token_to_image(q=q, k=k, v=keys))
    up = decoder.output_upscaling(keys.transpose(1, 2).reshape(b, c, h, w))  # (B, C/8, 4h, 4w)
    hyper = decoder.output_hypernetworks_mlps[0](queries[:, 1])  # (B, C/8)
    return (hyper[:, None] @ up.flatten(2)).reshape(b, 1, *up.shape[-2:])


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017), mean over pixels; ``target`` in {0, 1}, same shape as ``logits``."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    a_t = alpha * target + (1 - alpha) * (1 - target)
    return (a_t * (1 - p_t) ** gamma * ce).mean()


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-6) -> torch.Tensor:
    """Soft Dice on sigmoid probabilities, per sample ``(B, ...)``, then averaged."""
    p, t = logits.sigmoid().flatten(1), target.flatten(1)
    return (1 - (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)).mean()


def mapsam_loss(
    final: torch.Tensor, coarse: torch.Tensor, target: torch.Tensor, dice_weight: float = 0.8
) -> dict[str, torch.Tensor]:
    """``(1-w)·focal + w·Dice`` on the final mask and on the coarse mask, both resized to the target.

    Args:
        final, coarse: logits ``(B, 1, h, w)`` (any sizes; bilinearly resized to the target's).
        target: binary masks ``(B, H, W)`` in {0, 1}.
        dice_weight: ``w`` (MapSAM: 0.8).
    """
    t = target[:, None].float()  # (B, 1, H, W)
    parts = {}
    for name, logits in (("final", final), ("coarse", coarse)):
        logits = F.interpolate(logits, size=t.shape[-2:], mode="bilinear", align_corners=False)
        parts[name] = (1 - dice_weight) * focal_loss(logits, t) + dice_weight * dice_loss(logits, t)
    return {"loss": parts["final"] + parts["coarse"], **parts}
