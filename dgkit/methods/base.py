"""The ``Method`` base: everything a domain-generalisation objective shares.

It owns the head (built by the task, :mod:`dgkit.tasks`), the training and validation steps, the per-domain
metric (the task's torchmetrics objects), logging, the optimiser and scheduler (Hydra ``_partial_`` configs,
so optimiser sweeps need no code), and :meth:`Method.to_inference`, the plain module that prediction,
compression and export start from. A subclass overrides :meth:`Method.training_losses` and, in the common case,
nothing else.

Evaluation is DomainBed's: the ``in`` and ``out`` split of every domain, logged as
``val/<metric>/<domain>/<split>``, and the training-domain validation score ``val/<metric>/source_out``. There
is no ``trainer.test`` path: a held-out domain's score is its ``in`` split in those records.

Batch Styles Standardization (``+augment=bss``, see ``dgkit.data.style``) reaches objectives through
:meth:`Method.with_bss_copy`: one line after :meth:`Method.concat` appends the standardised copy of the batch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import ClassVar

import pytorch_lightning as pl
import torch
from torch import nn

from dgkit.adapters import merge, regularizers
from dgkit.data.benchmark import eval_splits
from dgkit.data.style import BatchStylesStandardization
from dgkit.tasks import Classification, Task


def source_val_key(metric: str) -> str:
    """The logged training-domain validation score (mean over source ``out`` splits) for a task's metric."""
    return f"val/{metric}/source_out"


class InferenceModel(nn.Module):
    """A trained model for deployment: normalised images ``(B, C, H, W)`` to the task's outputs (class logits).

    Built by :meth:`Method.to_inference`: adapters merged, no training-only parts.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, task: Task) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.task = task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The head's outputs on the task's backbone features."""
        return self.head(self.task.features(self.backbone, x))


class WarmupPolyLR(torch.optim.lr_scheduler.LambdaLR):
    """Linear warm-up, then polynomial decay to 0 (SAMed's and MapSAM's schedule), stepped every training step.

    The factor on each group's base learning rate at optimisation step ``t`` (0-based) is ``(t + 1) / W`` for
    ``t < W`` and ``(1 - (t - W) / (T - W)) ** power`` after, 0 from ``T`` on. MapSAM: ``W = 250`` iterations,
    ``power = 0.9``, ``T`` its whole budget. Configure it as ``method.scheduler`` (a ``_partial_`` taking the
    optimiser) with ``total_steps: ${trainer.max_steps}``, so it follows the run's step budget; ``warmup_fraction``
    scales the warm-up with the budget too.

    Args:
        optimizer: the optimiser.
        total_steps: ``T``, the run's step budget (``trainer.max_steps``).
        warmup_steps: ``W`` in steps (0: no warm-up); exclusive with ``warmup_fraction``.
        warmup_fraction: ``W = round(warmup_fraction · T)``.
        power: the poly exponent (0.9).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        warmup_steps: int = 0,
        warmup_fraction: float | None = None,
        power: float = 0.9,
        last_epoch: int = -1,
    ) -> None:
        if warmup_fraction is not None and warmup_steps:
            raise ValueError("scheduler: set warmup_steps or warmup_fraction, not both")
        if warmup_fraction is not None and not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"scheduler.warmup_fraction={warmup_fraction}: must be in [0, 1)")
        warmup = round(warmup_fraction * total_steps) if warmup_fraction is not None else int(warmup_steps)
        if total_steps < 1 or not 0 <= warmup < total_steps or power <= 0:
            raise ValueError(
                f"scheduler: total_steps={total_steps} must be >= 1 (trainer.max_steps), the warm-up ({warmup} "
                f"steps) in [0, total_steps) and power={power} > 0"
            )
        self.total_steps, self.warmup, self.power = int(total_steps), warmup, float(power)
        super().__init__(optimizer, self.factor, last_epoch)

    def factor(self, step: int) -> float:
        """The learning-rate factor at optimisation step ``step`` (0-based)."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        return max(0.0, 1.0 - (step - self.warmup) / (self.total_steps - self.warmup)) ** self.power


class Method(pl.LightningModule):
    """Base LightningModule of every objective.

    Args:
        backbone: a built backbone (``forward`` gives ``(B, num_features)``).
        num_classes: number of classes.
        domains: every domain of the benchmark, in order.
        test_domains: the held-out domains (never used for training or model selection).
        optimizer: ``partial`` taking the parameters (e.g. ``torch.optim.Adam`` with ``lr``).
        scheduler: optional ``partial`` taking the optimiser; stepped every training step.
        task: the task (head, loss, metric, prediction rule); classification when omitted.

    Attributes:
        bss: Batch Styles Standardization from ``augment.bss`` (``None``: off). The composition root sets it
            after construction, so subclasses need not forward it; objectives use it via :meth:`with_bss_copy`.
        train_views: augmented views per training image the method needs from the data (SSL: 2).
        exports_backbone: whether a finished run writes ``backbone.safetensors`` (SSL: the backbone is the product).
        per_image_mechanism: what in the objective needs one target per image, predicted from pooled features
            (DANN: its domain discriminator...); ``None``: nothing, the objective works for every task. A task
            without per-image targets (``Task.per_image`` false: segmentation) is refused with this reason.
    """

    train_views: ClassVar[int] = 1
    exports_backbone: ClassVar[bool] = False
    per_image_mechanism: ClassVar[str | None] = None
    double_backward: ClassVar[bool] = False  # back-propagates through a gradient of the backbone (no torch.compile)

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        domains: Sequence[str],
        test_domains: Sequence[str],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        task: Task | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "optimizer", "scheduler", "task"])
        self.task = task or Classification()
        if self.per_image_mechanism and not self.task.per_image:
            raise ValueError(
                f"{type(self).__name__} is not defined for task={self.task.name} ({self.task.target}): "
                f"{self.per_image_mechanism}; use an objective without one (erm, sharpness)"
            )
        self.backbone = backbone
        self.classifier = self.task.build_head(backbone, num_classes)
        self.domains = list(domains)
        self.test_domains = list(test_domains)
        self.source_domains = [d for d in self.domains if d not in self.test_domains]
        self.optimizer_factory = optimizer or (lambda params: torch.optim.Adam(params, lr=1e-3))
        self.scheduler_factory = scheduler
        self.eval_names = eval_splits(self.domains)
        self.val_metrics = nn.ModuleList(self.task.build_metric(num_classes) for _ in self.eval_names)
        self.bss: BatchStylesStandardization | None = None
        self.extra_callbacks: list[pl.Callback] = []  # set by the composition root (adapter callbacks)
        self.meta: dict = {}  # set by the composition root: what checkpoints store to rebuild without data
        self._bss_used = False  # set by whatever consumes self.bss; checked after each training step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The task's outputs (class logits ``(B, num_classes)``)."""
        return self.classifier(self.task.features(self.backbone, x))

    @property
    def source_val_key(self) -> str:
        """The logged training-domain validation score that selects ``best.ckpt``."""
        return source_val_key(self.task.metric)

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
        """Accumulate the task's metric on one split of one domain."""
        x, y = batch
        self.task.update_metric(self.val_metrics[dataloader_idx], self(x), y)

    def on_validation_epoch_end(self) -> None:
        """Log ``val/<metric>/<domain>/<in|out>`` for every domain (and the task's secondary scores, e.g.
        ``val/dice/<domain>/<split>``) and the selection score on source ``out`` splits."""
        metric_key = self.task.metric
        source_out = []
        for (domain, split), metric in zip(self.eval_names, self.val_metrics):
            if not metric.update_called:
                continue  # an empty split (holdout_fraction=0) has no score
            score = metric.compute()
            secondary = self.task.secondary_scores(metric)
            metric.reset()
            # sync_dist: torchmetrics' compute() already gathered every process's counts, so the values agree and
            # averaging them changes nothing; it only tells Lightning so (no warning per key under DDP)
            self.log(f"val/{metric_key}/{domain}/{split}", score, sync_dist=True)
            for key, value in secondary.items():
                self.log(f"val/{key}/{domain}/{split}", value, sync_dist=True)
            if split == "out" and domain in self.source_domains:
                source_out.append(score)
        if source_out:
            self.log(self.source_val_key, torch.stack(source_out).mean(), prog_bar=True, sync_dist=True)

    def step_budget_dependence(self) -> list[str]:
        """What in this objective depends on ``trainer.max_steps`` (empty: nothing).

        A run whose schedule depends on the step budget cannot honestly be extended to more steps, nor resumed
        under another budget: its first part followed another schedule. Subclasses add their own reasons.
        """
        return ["the learning-rate scheduler (its horizon may be the step budget)"] if self.scheduler_factory else []

    def use_eval_sets(self, names: Sequence[tuple[str, str]]) -> None:
        """Evaluate on these ``(domain, split)`` sets, in the DataModule's loader order (the composition root
        passes ``datamodule.eval_names``: crafted-shift sets join the default ``in``/``out`` splits)."""
        self.eval_names = list(names)
        self.val_metrics = nn.ModuleList(self.task.build_metric(self.hparams.num_classes) for _ in self.eval_names)

    # ---- deployment -----------------------------------------------------------------------------------
    def to_inference(self) -> nn.Module:
        """A plain module mapping a normalised image batch to the task's outputs, for prediction and export.

        A copy: adapters are merged into plain layers, training-only parts (discriminators, projectors, memory
        banks, extra heads) are left behind, and the module is in eval mode. Methods with another inference
        rule (DRM) or no trained head (SimCLR) override this.
        """
        backbone = merge(copy.deepcopy(self.backbone))
        return InferenceModel(backbone, copy.deepcopy(self.classifier), self.task).eval()

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
