"""The ``Method`` base: everything a domain-generalisation objective shares.

It owns the classifier head, the training/validation/test steps, per-domain accuracy (torchmetrics),
logging, and the optimiser and scheduler (Hydra ``_partial_`` configs, so optimiser sweeps need no code).
A subclass overrides :meth:`Method.training_losses` and, in the common case, nothing else.

Batch Styles Standardization (``+augment=bss``, see ``dgkit.data.style``) reaches objectives through
:meth:`Method.with_bss_copy`: one line after :meth:`Method.concat` appends the standardised copy of the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from dgkit.adapters import regularizers
from dgkit.data.benchmark import eval_splits
from dgkit.data.style import BatchStylesStandardization

SOURCE_VAL_METRIC = "val/acc/source_out"


class Method(pl.LightningModule):
    """Base LightningModule of every objective.

    Args:
        backbone: a built backbone (``forward`` gives ``(B, num_features)``).
        num_classes: number of classes.
        domains: every domain of the benchmark, in order.
        test_domains: the held-out domains (never used for training or model selection).
        optimizer: ``partial`` taking the parameters (e.g. ``torch.optim.Adam`` with ``lr``).
        scheduler: optional ``partial`` taking the optimiser; stepped every training step.

    Attributes:
        bss: Batch Styles Standardization from ``augment.bss`` (``None``: off). The composition root sets it
            after construction, so subclasses need not forward it; objectives use it via :meth:`with_bss_copy`.
        train_views: augmented views per training image the method needs from the data (SSL: 2).
        exports_backbone: whether a finished run writes ``backbone.safetensors`` (SSL: the backbone is the product).
    """

    train_views: ClassVar[int] = 1
    exports_backbone: ClassVar[bool] = False

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        domains: Sequence[str],
        test_domains: Sequence[str],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "optimizer", "scheduler"])
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes}: a classifier needs at least 2 classes")
        self.backbone = backbone
        self.classifier = nn.Linear(backbone.num_features, num_classes)
        self.domains = list(domains)
        self.test_domains = list(test_domains)
        self.source_domains = [d for d in self.domains if d not in self.test_domains]
        self.optimizer_factory = optimizer or (lambda params: torch.optim.Adam(params, lr=1e-3))
        self.scheduler_factory = scheduler
        self.eval_names = eval_splits(self.domains)
        self.val_acc = nn.ModuleList(MulticlassAccuracy(num_classes, average="micro") for _ in self.eval_names)
        self.test_acc = nn.ModuleList(MulticlassAccuracy(num_classes, average="micro") for _ in self.domains)
        self.bss: BatchStylesStandardization | None = None
        self.extra_callbacks: list[pl.Callback] = []  # set by the composition root (adapter callbacks)
        self._bss_used = False  # set by whatever consumes self.bss; checked after each training step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)``."""
        return self.classifier(self.backbone(x))

    # ---- training -------------------------------------------------------------------------------------
    def training_losses(self, batch: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The objective on one step: ``{"loss": total, "<part>": ...}`` from ``{domain: (x, y)}``."""
        raise NotImplementedError

    def training_step(self, batch: dict[str, tuple[torch.Tensor, torch.Tensor]], batch_idx: int) -> torch.Tensor:
        """Compute and log the loss dict; Lightning back-propagates ``loss``."""
        losses = self.training_losses(batch)
        if self.bss is not None and not self._bss_used:
            raise RuntimeError(
                f"augment.bss is set but {type(self).__name__} does not use it: its training_losses must call "
                "self.with_bss_copy(...) (drop +augment=bss or add that line)"
            )
        self.log_losses(losses, sum(len(y) for _, y in batch.values()))
        return losses["loss"]

    def log_losses(self, losses: dict[str, torch.Tensor], batch_size: int) -> None:
        """Log every entry of a loss dict as ``train/<key>`` (also for manual-optimisation steps)."""
        for key, value in losses.items():
            self.log(f"train/{key}", value.detach(), prog_bar=key == "loss", batch_size=batch_size)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Add the gradient of the backbone adapters' penalty (``dgkit.adapters.regularizers``, e.g. PEGO's
        orthogonality loss) and log it as ``train/reg``.

        Back-propagating it here, once per optimiser step, is adding it to the loss; it also reaches objectives
        with manual optimisation (sharpness, UDIM, alternating DANN: only for the optimiser that steps the backbone).
        """
        reg = regularizers(self.backbone)
        if reg is None or not reg.requires_grad:
            return
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not any(id(p) in stepped for p in self.backbone.parameters() if p.requires_grad):
            return
        reg.backward()
        self.log("train/reg", reg.detach())

    @staticmethod
    def concat(batch: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """All source domains of a step as one batch ``(x, y)``."""
        xs, ys = zip(*batch.values())
        return torch.cat(xs), torch.cat(ys)

    def with_bss_copy(self, x: torch.Tensor, *targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(x, *targets)``, plus the BSS copy of ``x`` appended with probability ``augment.bss.p``.

        The copy standardises the whole (multi-domain) batch to one reference style; the originals are kept,
        so batch-norm statistics still see natural images. Every target (labels, domain labels...) is repeated
        to match. Without ``augment.bss`` the inputs come back unchanged.

        Args:
            x: normalised images ``(B, C, H, W)``.
            targets: tensors ``(B, ...)`` aligned with ``x``.

        Returns:
            ``(x, *targets)`` with ``B`` or ``2B`` rows; rows ``B:`` are ``BSS(x)``.
        """
        if self.bss is None:
            return (x, *targets)
        self._bss_used = True
        if not self.bss.should_apply():
            return (x, *targets)
        cfg = self.backbone.data_config
        x_bss = self.bss(x, cfg.mean, cfg.std)  # (B, C, H, W)
        return (torch.cat([x, x_bss]), *(torch.cat([t, t]) for t in targets))

    # ---- evaluation -----------------------------------------------------------------------------------
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0):
        """Accumulate accuracy on one split of one domain."""
        x, y = batch
        self.val_acc[dataloader_idx].update(self(x).argmax(-1), y)

    def on_validation_epoch_end(self) -> None:
        """Log ``val/acc/<domain>/<in|out>`` for every domain and the selection metric on source ``out`` splits."""
        source_out = []
        for (domain, split), metric in zip(self.eval_names, self.val_acc):
            if not metric.update_called:
                continue  # an empty split (holdout_fraction=0) has no accuracy
            acc = metric.compute()
            metric.reset()
            self.log(f"val/acc/{domain}/{split}", acc)
            if split == "out" and domain in self.source_domains:
                source_out.append(acc)
        if source_out:
            self.log(SOURCE_VAL_METRIC, torch.stack(source_out).mean(), prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0):
        """Accumulate accuracy on every image of one domain."""
        x, y = batch
        self.test_acc[dataloader_idx].update(self(x).argmax(-1), y)

    def on_test_epoch_end(self) -> None:
        """Log ``test/acc/<domain>`` for every domain."""
        for domain, metric in zip(self.domains, self.test_acc):
            if metric.update_called:
                self.log(f"test/acc/{domain}", metric.compute())
                metric.reset()

    # ---- optimisation ---------------------------------------------------------------------------------
    def configure_callbacks(self) -> list[pl.Callback]:
        """Callbacks the adapter asked for (``extra_callbacks``, e.g. SoMA's annealed weight decay)."""
        return list(self.extra_callbacks)

    def configure_optimizers(self):
        """Build the optimiser (and per-step scheduler) from the configured partials, trainable params only."""
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
