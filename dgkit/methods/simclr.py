"""SimCLR (Chen et al., ICML 2020) with Batch Styles Standardization (Scalbert et al., ICLR 2024, arXiv 2303.06088).

Unsupervised domain generalisation as in the BSS paper: contrastive pre-training on the pooled, unlabelled
source domains, then a linear probe with labels (``method=linear_probe`` with ``backbone.weights=`` the file
this run exports). Each step takes two augmented views of every image from the data pipeline
(``train_views = 2``), forms the two view columns over all source domains, and per column, in [0, 1] pixel
space: batch-wise colour jitter (one draw per column), then BSS (``+augment=bss``; an independent reference
and ratio per column, applied with probability ``augment.bss.p``). Negatives within a column then share one
style and differ only in content, while the two positives of an image carry different styles.

The projector MLP is training-only: the run exports the backbone alone (``<output_dir>/backbone.safetensors``,
last step). Labels are never used for training; the base class's linear head stays untrained, so the
``val/acc`` and ``test/acc`` this method logs are those of a random head (chance level) and the checkpoint
"selected" by them means nothing. Evaluate the exported backbone with a linear probe instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dgkit.data.style import BatchColorJitter, normalize, unnormalize
from dgkit.methods.base import Method
from dgkit.tasks import Task


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy over ``2N`` embeddings.

    With ``z = normalize([z1; z2])`` and ``s_ij = z_i . z_j / t``, the loss of anchor ``i`` is
    ``-log(exp(s_i,pos(i)) / sum_{j != i} exp(s_ij))`` where ``pos(i)`` is the other view of the same image;
    the result is the mean over all ``2N`` anchors.

    Args:
        z1: embeddings of the first views ``(N, D)``.
        z2: embeddings of the second views ``(N, D)``; row ``i`` is the positive of ``z1[i]``.
        temperature: softmax temperature ``t`` > 0.
    """
    n = len(z1)
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # (2N, D)
    sim = z @ z.T / temperature  # (2N, 2N)
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))  # no self-pairs
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)  # (2N,)
    return F.cross_entropy(sim, positives)


class SimCLR(Method):
    """Contrastive pre-training on two views per image; BSS per view column when ``self.bss`` is set.

    Args:
        backbone: a built backbone (``forward`` gives ``(B, num_features)``).
        num_classes: number of classes (for the base class's untrained head; labels are not used).
        domains: every domain of the benchmark, in order.
        test_domains: the held-out domains.
        optimizer: ``partial`` taking the parameters.
        scheduler: optional ``partial`` taking the optimiser.
        temperature: NT-Xent temperature.
        projector_hidden: hidden width of the projector MLP (``None``: the backbone's ``num_features``).
        projector_dim: output width of the projector (the space NT-Xent compares in).
        color_jitter: batch-wise colour jitter strengths ``[brightness, contrast, saturation, hue]``
            (``None`` or all zeros: off).
        color_jitter_p: probability of jittering a view column.
        projector_batchnorm: batch norm after the projector's hidden linear layer (SimCLR's official head). Without
            it, a backbone whose pooled features share a large common component (a random-init GroupNorm CNN:
            projected embeddings start at cosine 0.93 to each other) collapses: every similarity becomes equal
            and NT-Xent sits at ``ln(2N - 1)``.
    """

    train_views: ClassVar[int] = 2
    exports_backbone: ClassVar[bool] = True

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        domains: Sequence[str],
        test_domains: Sequence[str],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        temperature: float = 0.5,
        projector_hidden: int | None = None,
        projector_dim: int = 128,
        color_jitter: Sequence[float] | None = (0.4, 0.4, 0.4, 0.1),
        color_jitter_p: float = 0.8,
        projector_batchnorm: bool = True,
        task: Task | None = None,
    ) -> None:
        super().__init__(backbone, num_classes, domains, test_domains, optimizer, scheduler, task=task)
        if temperature <= 0:
            raise ValueError(f"method.temperature={temperature} must be > 0")
        if projector_dim < 1 or (projector_hidden is not None and projector_hidden < 1):
            raise ValueError(f"method.projector_hidden={projector_hidden}, projector_dim={projector_dim} must be >= 1")
        if color_jitter is not None and len(color_jitter) != 4:
            raise ValueError(f"method.color_jitter={list(color_jitter)} needs [brightness, contrast, saturation, hue]")
        self.temperature = temperature
        hidden = projector_hidden or backbone.num_features
        norm = [nn.BatchNorm1d(hidden)] if projector_batchnorm else []
        self.projector = nn.Sequential(
            nn.Linear(backbone.num_features, hidden), *norm, nn.ReLU(inplace=True), nn.Linear(hidden, projector_dim)
        )
        jitter_on = color_jitter is not None and any(s > 0 for s in color_jitter)
        self.color_jitter = BatchColorJitter(*color_jitter, p=color_jitter_p) if jitter_on else None

    def to_inference(self) -> nn.Module:
        """Refused: a SimCLR run trains no head (its classifier is random).

        Raises:
            ValueError: always, naming the way to get a classifier from this backbone.
        """
        raise ValueError(
            "SimCLR trains no classification head: its run exports backbone.safetensors; train a linear probe on it "
            "(method=linear_probe backbone.weights=<run folder>/backbone.safetensors, e.g. +exp=digits_linear_probe) "
            "and predict or export that probe's checkpoint"
        )

    def training_losses(self, batch: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``{"loss": NT-Xent}`` over the two view columns of all source domains (labels ignored)."""
        views = torch.cat([x for x, _ in batch.values()], dim=1)  # (V, N, C, H, W), domains pooled
        if views.dim() != 5 or len(views) != 2:
            raise ValueError(
                f"SimCLR needs 2 views per image, (2, B, C, H, W) batches; got {tuple(views.shape)} "
                "(build the DataModule with views=2: the composition root does so from train_views)"
            )
        columns = [self._augment_column(v) for v in views]  # 2 x (N, C, H, W)
        z1, z2 = self.projector(self.backbone(torch.cat(columns))).chunk(2)  # 2 x (N, projector_dim)
        return {"loss": nt_xent(z1, z2, self.temperature)}

    def _augment_column(self, x: torch.Tensor) -> torch.Tensor:
        """Batch-wise jitter then BSS on one view column ``(N, C, H, W)``, in [0, 1] pixel space."""
        use_bss = False
        if self.bss is not None:
            self._bss_used = True
            use_bss = self.bss.should_apply()
        if self.color_jitter is None and not use_bss:
            return x
        cfg = self.backbone.data_config
        pixels = unnormalize(x, cfg.mean, cfg.std).clamp(0.0, 1.0)  # (N, C, H, W) in [0, 1]
        if self.color_jitter is not None:
            pixels = self.color_jitter(pixels)
        if use_bss:
            pixels = self.bss.standardize(pixels)  # one reference and ratio for this column
        return normalize(pixels, cfg.mean, cfg.std).to(x.dtype)
