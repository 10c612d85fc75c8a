"""Segment Anything's promptable pre-training (Kirillov et al., ICCV 2023, §3 and appendix A) on instance masks.

Per image, up to ``objects`` of its visible objects are drawn; each is prompted, with equal probability, by its
bounding box (each side jittered by N(0, (0.1 · side)²), clipped to 20 px at 1024 px, scaled to the input size)
or by one point drawn uniformly inside its mask. A single point is ambiguous, so point prompts predict SAM's 3
masks and only the one with the lowest mask loss is back-propagated; a box predicts the single-mask output.
The mask loss is ``20 · focal + 1 · Dice`` on the logits upsampled to the input (SAM's 20:1), and the IoU head
learns, by mean squared error, the IoU of each predicted mask (logit > 0) with the object. With
``corrective_points`` > 0, SAM's interactive rounds follow: a point drawn uniformly from the error region of the
previous mask (positive on a missed pixel, negative on a false one) is added to the prompt, the previous
low-resolution logits become the mask prompt, and the single-mask output is trained again. The loss is the mean
over rounds.

The whole SAM trains (image encoder, prompt encoder, mask decoder), called part by part (``Sam.forward`` runs
under ``no_grad``) and one image per decoder call (the decoder repeats the image embedding per prompt row).
Validation prompts every visible object with its exact box and records the mean IoU through
``task=promptable`` (``val/box_miou/<domain>/<split>``). The run's product is ``backbone.safetensors`` (all of
SAM, official key names), for ``backbone=sam_tiny backbone.prompt_decoder=true backbone.weights=PATH``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dgkit.backbones.base import Backbone
from dgkit.methods.base import Method
from dgkit.tasks import Task
from dgkit.tasks.promptable import PromptableSegmentation


def focal_per_mask(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017) averaged over the pixels of each mask.

    Args:
        logits: ``(N, M, H, W)`` (M masks per prompt).
        target: ``(N, 1, H, W)`` or ``(N, M, H, W)`` in {0, 1}.

    Returns:
        ``(N, M)``.
    """
    target = target.expand_as(logits).to(logits.dtype)
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    a_t = alpha * target + (1 - alpha) * (1 - target)
    return (a_t * (1 - p_t) ** gamma * ce).flatten(2).mean(-1)


def dice_per_mask(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss ``1 - (2 Σ p t + s) / (Σ p + Σ t + s)`` on sigmoid probabilities, per mask ``(N, M)``."""
    target = target.expand_as(logits).to(logits.dtype)
    p = logits.sigmoid().flatten(2)
    t = target.flatten(2)
    return 1 - (2 * (p * t).sum(-1) + smooth) / (p.sum(-1) + t.sum(-1) + smooth)


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of each thresholded mask (logit > 0) with its target, ``(N, M)`` (1 when both are empty)."""
    p = (logits > 0).flatten(2)
    t = target.expand_as(logits).bool().flatten(2)
    inter, union = (p & t).sum(-1).float(), (p | t).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def min_mask_loss(
    logits: torch.Tensor,
    iou_pred: torch.Tensor,
    target: torch.Tensor,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """SAM's loss per prompt row: the lowest ``focal_weight · focal + dice_weight · Dice`` over its M masks, plus the
    MSE between the IoU head and each mask's actual IoU (mean over the M masks).

    Args:
        logits: ``(N, M, H, W)`` at the target's size.
        iou_pred: ``(N, M)``, the IoU head's outputs.
        target: ``(N, 1, H, W)`` in {0, 1}.

    Returns:
        ``{"mask": (N,), "focal": (N,), "dice": (N,), "iou": (N,), "choice": (N,) long}`` (the chosen mask's terms).
    """
    focal, dice = focal_per_mask(logits, target), dice_per_mask(logits, target)  # (N, M) each
    per_mask = focal_weight * focal + dice_weight * dice
    choice = per_mask.argmin(1)  # (N,): only the best mask is back-propagated
    rows = torch.arange(len(choice), device=logits.device)
    iou_target = mask_iou(logits.detach(), target)  # (N, M)
    iou = F.mse_loss(iou_pred, iou_target, reduction="none").mean(1)
    return {"mask": per_mask[rows, choice], "focal": focal[rows, choice], "dice": dice[rows, choice], "iou": iou,
            "choice": choice}  # fmt: skip


def box_of(mask: torch.Tensor) -> torch.Tensor:
    """The tight box ``(x0, y0, x1, y1)`` of a non-empty mask ``(H, W)``, in pixel indices (SAM's XYXY input)."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.stack([xs.min(), ys.min(), xs.max(), ys.max()]).float()


def sample_point(mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One pixel drawn uniformly inside a non-empty mask ``(H, W)``, as SAM's ``(x, y)`` input coordinates."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    i = int(torch.randint(len(xs), (1,), generator=generator))
    return torch.stack([xs[i], ys[i]]).float()


def jitter_box(
    box: torch.Tensor,
    size: tuple[int, int],
    std: float = 0.1,
    max_px: float = 20.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """SAM's box noise: each coordinate moves by N(0, (std · side)²) (side: the box's width for x, height for y),
    clipped to ``± max_px`` and to the image ``size`` ``(H, W)``; the corners stay ordered."""
    w, h = (box[2] - box[0] + 1).item(), (box[3] - box[1] + 1).item()
    scale = torch.tensor([w, h, w, h]) * std
    noise = (torch.randn(4, generator=generator) * scale).clamp(-max_px, max_px)
    x0, y0, x1, y1 = (box + noise).tolist()
    x0, x1 = sorted((min(max(x0, 0.0), size[1] - 1), min(max(x1, 0.0), size[1] - 1)))
    y0, y1 = sorted((min(max(y0, 0.0), size[0] - 1), min(max(y1, 0.0), size[0] - 1)))
    return torch.tensor([x0, y0, x1, y1])


def decode_rows(
    decoder: nn.Module, embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """segment-anything's ``MaskDecoder.predict_masks`` with one image embedding per prompt row, so the prompts of
    a whole batch of images decode in one call (the official call takes one image and repeats it per row).

    Args:
        decoder: a ``segment_anything.modeling.MaskDecoder``.
        embeddings: ``(R, C, g, g)``, row ``r``'s image embedding.
        image_pe: the prompt encoder's dense positional encoding ``(1, C, g, g)``.
        sparse, dense: the prompt encoder's outputs for the rows, ``(R, T, C)`` and ``(R, C, g, g)``.

    Returns:
        Low-resolution logits of every mask token ``(R, 1+M, 4g, 4g)`` and their IoU predictions ``(R, 1+M)``
        (token 0: the single-mask output; tokens 1..M: the multimask outputs).
    """
    out_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)  # (1 + 1+M, C)
    tokens = torch.cat([out_tokens[None].expand(len(sparse), -1, -1), sparse], dim=1)  # (R, 2+M+T, C)
    src = embeddings + dense  # (R, C, g, g)
    b, c, h, w = src.shape
    hs, src = decoder.transformer(src, image_pe.expand(b, -1, -1, -1), tokens)  # (R, tokens, C), (R, g*g, C)
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))  # (R, C/8, 4g, 4g)
    n = decoder.num_mask_tokens
    hyper = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1)
    masks = (hyper @ upscaled.flatten(2)).reshape(b, n, *upscaled.shape[-2:])
    return masks, decoder.iou_prediction_head(hs[:, 0])


def warmup_step_decay(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup: int = 250, decay_at: Sequence[float] = (0.667, 0.963),
    gamma: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:  # fmt: skip
    """SAM's schedule: linear warm-up over ``warmup`` steps, then ×``gamma`` at each fraction ``decay_at`` of
    ``total_steps`` (SAM: 250 warm-up steps, ×0.1 at 60k and 86,666 of 90k)."""
    if total_steps < 1 or warmup < 0 or not all(0 < f <= 1 for f in decay_at):
        raise ValueError(f"total_steps={total_steps} >= 1, warmup={warmup} >= 0, decay_at={list(decay_at)} in (0, 1]")
    milestones = [int(f * total_steps) for f in decay_at]

    def factor(step: int) -> float:
        ramp = min(1.0, (step + 1) / warmup) if warmup else 1.0
        return ramp * gamma ** sum(step >= m for m in milestones)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class SAMPretrain(Method):
    """SAM's promptable training of the whole SAM (see the module docstring).

    Args:
        backbone, num_classes, domains, test_domains, optimizer, scheduler, task: as :class:`Method`
            (``task=promptable``; targets are instance-id masks).
        objects: objects drawn per image and step (SAM: up to 64 per GPU image).
        box_probability: probability of a box prompt (else one point); SAM: 0.5.
        box_jitter: std of the box noise as a fraction of the box side (SAM: 0.1).
        max_jitter_px: noise clip at 1024 px (SAM: 20), scaled to the input size.
        focal_weight, dice_weight: SAM's 20:1.
        iou_weight: weight of the IoU head's MSE (SAM: 1).
        corrective_points: interactive rounds after the first, each adding one point from the error region.
        min_area: objects with fewer visible pixels (after augmentation) are not prompted.
        eval_objects: objects box-prompted per validation image.
    """

    exports_backbone: ClassVar[bool] = True

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        domains: Sequence[str],
        test_domains: Sequence[str],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        task: Task | None = None,
        objects: int = 2,
        box_probability: float = 0.5,
        box_jitter: float = 0.1,
        max_jitter_px: float = 20.0,
        focal_weight: float = 20.0,
        dice_weight: float = 1.0,
        iou_weight: float = 1.0,
        corrective_points: int = 0,
        min_area: int = 8,
        eval_objects: int = 8,
    ) -> None:
        if not (isinstance(backbone, Backbone) and backbone.prompt_decoder):  # the declared capability
            raise ValueError(
                "method=sam_pretrain trains SAM's prompt encoder and mask decoder too: use "
                "backbone=sam_tiny|sam_vit_b|sam_vit_l|sam_vit_h backbone.prompt_decoder=true"
            )
        if not isinstance(task, PromptableSegmentation):
            raise ValueError(
                "method=sam_pretrain needs prompts from instance masks: use task=promptable data=sam_corpus"
            )
        if getattr(backbone, "multimask_outputs", 3) < 1:
            raise ValueError("method=sam_pretrain needs backbone.multimask_outputs >= 1 (SAM: 3) for point prompts")
        if objects < 1 or eval_objects < 1 or corrective_points < 0 or min_area < 1:
            raise ValueError(
                f"method.objects={objects}, eval_objects={eval_objects}, min_area={min_area} must be >= 1 and "
                f"corrective_points={corrective_points} >= 0"
            )
        if not 0.0 <= box_probability <= 1.0:
            raise ValueError(f"method.box_probability={box_probability} must be in [0, 1]")
        super().__init__(backbone, num_classes, domains, test_domains, optimizer, scheduler, task)
        self.objects, self.box_probability = int(objects), float(box_probability)
        self.box_jitter = float(box_jitter)
        self.max_jitter = float(max_jitter_px) * backbone.img_size / 1024
        self.focal_weight, self.dice_weight, self.iou_weight = (
            float(focal_weight),
            float(dice_weight),
            float(iou_weight),
        )
        self.corrective_points, self.min_area, self.eval_objects = (
            int(corrective_points),
            int(min_area),
            int(eval_objects),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """SAM's image embedding ``(B, C, g, g)`` (prompts come with the targets: see :meth:`prompted_masks`)."""
        return self.backbone.forward_features(x)

    # ---- prompts and decoding -------------------------------------------------------------------------
    def _objects(self, ids: torch.Tensor, k: int) -> list[torch.Tensor]:
        """Binary masks ``(H, W)`` of up to ``k`` random objects of an instance map with ``min_area`` pixels or more."""
        present = [int(i) for i in torch.unique(ids) if i != 0]
        masks = [m for m in (ids == i for i in present) if int(m.sum()) >= self.min_area]
        return [masks[j] for j in torch.randperm(len(masks))[:k].tolist()]

    def _decode(self, embeddings: torch.Tensor, groups: list[dict], size: tuple[int, int]) -> list[tuple]:
        """Every group's prompts in one decoder pass: per group, logits at ``size`` ``(n, 1+M, H, W)``, low-res
        logits ``(n, 1+M, 4g, 4g)`` and IoU predictions ``(n, 1+M)`` (all mask tokens; callers slice)."""
        sam = self.backbone
        sparse, dense = [], []
        for g in groups:
            points = (g["coords"], g["labels"]) if g["coords"].shape[1] else None
            s, d = sam.prompt_encoder(points=points, boxes=g["boxes"], masks=g.get("mask_input"))
            sparse.append(s)
            dense.append(d)
        index = torch.cat([g["index"] for g in groups])
        low, iou = decode_rows(sam.mask_decoder, embeddings[index], sam.prompt_encoder.get_dense_pe(),
                               torch.cat(sparse), torch.cat(dense))  # fmt: skip
        logits = F.interpolate(low, size=size, mode="bilinear", align_corners=False)
        sizes = [len(g["index"]) for g in groups]
        return list(zip(logits.split(sizes), low.split(sizes), iou.split(sizes)))

    def _groups(self, y: torch.Tensor, size: tuple[int, int]) -> list[dict]:
        """Up to ``objects`` objects per image, split into a box-prompted and a point-prompted group."""
        index, masks = [], []
        for i in range(len(y)):
            for m in self._objects(y[i], self.objects):
                index.append(i)
                masks.append(m)
        if not masks:
            return []
        index, masks = torch.tensor(index, device=y.device), torch.stack(masks)  # (R,), (R, H, W)
        use_box = torch.rand(len(masks)) < self.box_probability
        groups = []
        if use_box.any():
            m = masks[use_box.to(y.device)]
            boxes = torch.stack([jitter_box(box_of(o), size, self.box_jitter, self.max_jitter) for o in m])
            groups.append({"index": index[use_box.to(y.device)], "target": m, "boxes": boxes.to(y.device),
                           "coords": boxes.new_zeros(len(m), 0, 2).to(y.device),
                           "labels": boxes.new_zeros(len(m), 0).to(y.device), "multimask": False})  # fmt: skip
        if (~use_box).any():
            m = masks[(~use_box).to(y.device)]
            coords = torch.stack([sample_point(o) for o in m])[:, None].to(y.device)  # (n, 1, 2) as (x, y)
            groups.append({"index": index[(~use_box).to(y.device)], "target": m, "boxes": None, "coords": coords,
                           "labels": coords.new_ones(len(m), 1), "multimask": True})  # fmt: skip
        return groups

    # ---- training -------------------------------------------------------------------------------------
    def training_losses(self, batch: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """SAM's loss over the prompted objects of every image, mean over rows and rounds (module docstring)."""
        x, y = self.with_bss_copy(*self.concat(batch))
        embeddings = self.backbone.forward_features(x)  # (B, C, g, g)
        size = tuple(x.shape[-2:])
        groups = self._groups(y, size)
        if not groups:
            zero = embeddings.sum() * 0.0  # no object in the batch: a zero loss that still reaches every parameter
            return {"loss": zero, "focal": zero, "dice": zero, "iou": zero}
        parts: dict[str, list[torch.Tensor]] = {"mask": [], "focal": [], "dice": [], "iou": []}
        multi = self.backbone.multimask_outputs
        for r in range(1 + self.corrective_points):
            for g, (logits, low, iou) in zip(groups, self._decode(embeddings, groups, size)):
                pick = slice(1, 1 + multi) if g["multimask"] and r == 0 else slice(0, 1)  # SAM's output choice
                losses = min_mask_loss(logits[:, pick], iou[:, pick], g["target"][:, None].float(),
                                       self.focal_weight, self.dice_weight)  # fmt: skip
                for name in parts:
                    parts[name].append(losses[name])
                if r < self.corrective_points:  # the next round: a point from the error region + the mask prompt
                    rows = torch.arange(len(logits), device=logits.device)
                    chosen = low[:, pick][rows, losses["choice"]].detach()  # (n, 4g, 4g)
                    pred = logits[:, pick][rows, losses["choice"]].detach() > 0  # (n, H, W)
                    new, lab = zip(*(_corrective(p, t) for p, t in zip(pred, g["target"])))
                    g["coords"] = torch.cat([g["coords"], torch.stack(new)[:, None].to(g["coords"])], dim=1)
                    g["labels"] = torch.cat([g["labels"], g["labels"].new_tensor(lab)[:, None]], dim=1)
                    g["mask_input"] = chosen[:, None]  # (n, 1, 4g, 4g)
        out = {k: torch.cat(v).mean() for k, v in parts.items()}
        return {"loss": out["mask"] + self.iou_weight * out["iou"], "focal": out["focal"], "dice": out["dice"],
                "iou": out["iou"]}  # fmt: skip

    # ---- evaluation -----------------------------------------------------------------------------------
    def prompted_masks(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Box-prompted mask logits ``(N, H, W)`` and their objects' masks ``(N, H, W)`` for the visible objects of
        a batch (up to ``eval_objects`` per image, the lowest ids); exact boxes, single-mask output."""
        embeddings = self.backbone.forward_features(x)
        size = tuple(x.shape[-2:])
        index, masks = [], []
        for i in range(len(x)):
            for v in [int(v) for v in torch.unique(y[i]) if v != 0][: self.eval_objects]:
                index.append(i)
                masks.append(y[i] == v)
        if not masks:
            return x.new_zeros(0, *size), torch.zeros(0, *size, dtype=torch.bool, device=x.device)
        masks = torch.stack(masks)
        boxes = torch.stack([box_of(m) for m in masks]).to(x.device)
        empty = boxes.new_zeros(len(boxes), 0, 2)  # no points: the boxes alone
        group = {
            "index": torch.tensor(index, device=x.device),
            "boxes": boxes,
            "coords": empty,
            "labels": empty[..., 0],
        }
        ((logits, _, _),) = self._decode(embeddings, [group], size)
        return logits[:, 0], masks

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0):
        """Accumulate the box-prompted masks' IoU on one split of one domain (``task=promptable``'s metric)."""
        x, y = batch
        logits, targets = self.prompted_masks(x, y)
        if len(logits):
            self.task.update_metric(self.val_metrics[dataloader_idx], logits, targets)

    def to_inference(self) -> nn.Module:
        """Refused: a promptable model needs prompts; its product is ``backbone.safetensors``.

        Raises:
            ValueError: always, naming how to use the pre-trained weights.
        """
        raise ValueError(
            "method=sam_pretrain trains a promptable SAM: its run exports backbone.safetensors; fine-tune it "
            "(method=mapsam backbone=sam_tiny backbone.prompt_decoder=true backbone.weights=<run>/backbone.safetensors)"
        )


def _corrective(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, int]:
    """SAM's next interactive point: uniform over the error region of ``pred`` against ``target`` (both ``(H, W)``
    bool); label 1 on a missed pixel, 0 on a false one. No error: a positive point inside the target."""
    error = pred ^ target
    if not error.any():
        return sample_point(target), 1
    point = sample_point(error)
    return point, int(target[int(point[1]), int(point[0])])
