"""MapSAM / DoRA-SAM (Xia et al., arXiv 2411.06971): prompt-free SAM for binary map segmentation.

SAM's image encoder (adapted by ``adapter=dora_sam``), SPGen heads on its neck-projected intermediate maps giving
a coarse mask, automatic point prompts from that mask (top-k positive, bottom-k negative), the mean foreground
embedding as positional-semantic prompt, masked token-to-image attention in SAM's mask decoder, and
0.2 focal + 0.8 Dice on the final and the coarse mask (parts in :mod:`dgkit.methods.mapsam_parts`).

SAM's ``Sam.forward`` runs under ``no_grad``, so the encoder, prompt encoder and mask decoder are called directly.
SAM's ``MaskDecoder.predict_masks`` repeats one image embedding per prompt row, so MapSAM's code calls it once per
image; :func:`~dgkit.methods.mapsam_parts.decode` pairs image ``i`` with prompt set ``i`` and decodes the whole batch
in one call (equal to the per-image calls, tested). The backbone must be a SAM
backbone built with ``backbone.prompt_decoder=true`` (the backbone's ``prompt_decoder`` capability); adapters
act on its image encoder only, and ``variant`` decides whether the prompt encoder and mask decoder train. Outputs
are two-class logits ``[0, mask logit]`` at the input size, so the segmentation task's argmax is MapSAM's
``sigmoid > 0.5`` and its metrics apply unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dgkit.adapters import merge
from dgkit.backbones.base import Backbone
from dgkit.methods.base import Method
from dgkit.methods.mapsam_parts import SPGen, automatic_points, decode, mapsam_loss
from dgkit.tasks import Task

VARIANTS = ("trained_decoder", "frozen_decoder")


class MapSAM(Method):
    """DoRA-SAM with automatic prompts (binary tasks).

    Args:
        backbone, num_classes, domains, test_domains, optimizer, scheduler, task: as :class:`Method`
            (``num_classes`` must be 2).
        variant: ``trained_decoder`` (MapSAM: SAM's prompt encoder and mask decoder train, whatever the adapter does
            to the encoder) or ``frozen_decoder`` (both stay as loaded; with ``adapter=freeze`` only SPGen trains:
            the study's zero-shot arm, SAM's pretrained decoder prompted automatically).
        points: positive and negative points per image (MapSAM: 2 each).
        masked_attention: mask the decoder's token-to-image attention with the coarse / intermediate masks.
        semantic_prompt: add the mean foreground embedding to the decoder's query tokens.
        double_softmax: reproduce the official double softmax in masked attention (comparison only).
        dice_weight: ``w`` in ``(1-w)·focal + w·Dice`` (MapSAM: 0.8).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        domains: Sequence[str],
        test_domains: Sequence[str],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        task: Task | None = None,
        variant: str = "trained_decoder",
        points: int = 2,
        masked_attention: bool = True,
        semantic_prompt: bool = True,
        double_softmax: bool = False,
        dice_weight: float = 0.8,
    ) -> None:
        if num_classes != 2:
            raise ValueError(f"method=mapsam segments one foreground class (num_classes=2), got {num_classes}")
        if not (isinstance(backbone, Backbone) and backbone.prompt_decoder):
            raise ValueError(
                f"method=mapsam needs a backbone with SAM's prompt encoder and mask decoder (the prompt_decoder "
                f"capability); {type(backbone).__name__} here has none: use backbone=sam_tiny|sam_vit_b|sam_vit_l|"
                "sam_vit_h backbone.prompt_decoder=true"
            )
        if variant not in VARIANTS:
            raise ValueError(f"method.variant={variant!r}; valid: {list(VARIANTS)}")
        if points < 1 or not 0.0 <= dice_weight <= 1.0:
            raise ValueError(f"method.points={points} must be >= 1 and method.dice_weight={dice_weight} in [0, 1]")
        super().__init__(backbone, num_classes, domains, test_domains, optimizer, scheduler, task)
        self.variant = variant
        for prefix in backbone.decoder_prefixes:  # the decoder is this method's head: it decides what trains there
            backbone.get_submodule(prefix.rstrip(".")).requires_grad_(variant == "trained_decoder")
        self.classifier = nn.Identity()  # the mask decoder is the head
        depth = len(backbone.feature_info)
        self.spgen_blocks = list(range(0, depth - 1, 4))  # MapSAM: blocks 0, 4, 8 of 12, plus the final embedding
        self.spgen = nn.ModuleList(SPGen(backbone.num_features) for _ in range(len(self.spgen_blocks) + 1))
        self.points, self.masked_attention = int(points), bool(masked_attention)
        self.semantic_prompt, self.double_softmax = bool(semantic_prompt), bool(double_softmax)
        self.dice_weight = float(dice_weight)

    def predict_masks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final mask logits ``(B, 1, 4g, 4g)`` and coarse logits ``(B, 1, g, g)`` for images ``(B, 3, H, W)``."""
        sam = self.backbone
        final, inter = sam.forward_intermediates(x, indices=self.spgen_blocks) if self.spgen_blocks else (
            sam.forward_features(x), []
        )  # fmt: skip
        maps = [*inter, final]  # (B, C, g, g) each, through the neck
        coarse = torch.stack([head(m) for head, m in zip(self.spgen, maps)]).mean(0)  # (B, 1, g, g)
        return self.decode_masks(final, coarse, tuple(x.shape[-2:])), coarse

    def decode_masks(self, final: torch.Tensor, coarse: torch.Tensor, input_size: tuple[int, int]) -> torch.Tensor:
        """Final mask logits ``(B, 1, 4g, 4g)`` from the image embeddings ``(B, C, g, g)`` and the coarse logits
        ``(B, 1, g, g)``: automatic prompts, semantic prompt and masked attention, the batch in one decoder call."""
        sam = self.backbone
        image_pe = sam.prompt_encoder.get_dense_pe()  # (1, C, g, g)
        points = automatic_points(coarse, input_size, self.points)  # (B, 2k, 2), (B, 2k)
        sparse, dense = sam.prompt_encoder(points=points, boxes=None, masks=None)  # (B, 2k+1, C), (B, C, g, g)
        keep = (coarse.detach().sigmoid() >= 0.5).flatten(1)  # (B, g*g)
        semantic = None
        if self.semantic_prompt:  # mean final embedding over each image's foreground; a zero row when it is empty
            emb, weight = final.detach().flatten(2), keep.to(final.dtype)[:, None]  # (B, C, g*g), (B, 1, g*g)
            semantic = (emb * weight).sum(-1) / weight.sum(-1).clamp_min(1.0)  # (B, C)
        return decode(
            sam.mask_decoder, final, image_pe, sparse, dense, keep, semantic, self.masked_attention,
            self.double_softmax,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Two-class logits ``(B, 2, H, W)``: ``[0, mask logit]`` upsampled to the input."""
        final, _ = self.predict_masks(x)
        logit = F.interpolate(final, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([torch.zeros_like(logit), logit], dim=1)

    def training_losses(self, batch: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``(1-w)·focal + w·Dice`` on the final and the coarse mask (foreground = class 1)."""
        x, y = self.with_bss_copy(*self.concat(batch))
        final, coarse = self.predict_masks(x)
        return mapsam_loss(final, coarse, (y == 1).float(), self.dice_weight)

    def to_inference(self) -> nn.Module:
        """A merged copy of this method in eval mode (images to two-class logits)."""
        model = copy.deepcopy(self)
        merge(model.backbone)
        return model.eval()
