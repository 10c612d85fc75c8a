"""Calibration data for compression, read from the source domains only, and the input statistics it yields.

:func:`calibration_data` draws ``images_per_domain`` images (seeded) from each source domain's training (``in``)
split, through the evaluation pipeline. Held-out domains are never read unless ``allow_target=true`` is passed
explicitly; the choice is recorded by every link that calibrates, so tables can mark it.

:func:`collect_inputs` runs the model once over the calibration batches with forward pre-hooks on the named
layers and keeps, per layer and per domain, what the transforms need: the per-input-channel mean ``|x|``
(AWQ's ``s_X``), the per-input-channel sum of squares (``||x_j||`` for Wanda-style pruning) and, on request, a
seeded subsample of input rows (AWQ's scale and clip search). One pass serves every transform.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Calibration:
    """Calibration batches per domain (normalised images and labels) and where they came from.

    Attributes:
        images: ``{domain: (n, C, H, W)}``.
        labels: ``{domain: (n,)}``.
        allow_target: held-out domains were allowed in (an analysis run, never a DG result).
    """

    images: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    allow_target: bool = False

    @property
    def domains(self) -> list[str]:
        """The domains calibration read, in order."""
        return list(self.images)

    def counts(self) -> dict[str, int]:
        """Images per domain."""
        return {d: len(x) for d, x in self.images.items()}

    def batches(self, batch_size: int = 64):
        """``(domain, images, labels)`` in batches, domain by domain."""
        for d, x in self.images.items():
            for start in range(0, len(x), batch_size):
                yield d, x[start : start + batch_size], self.labels[d][start : start + batch_size]

    def record(self) -> dict[str, Any]:
        """What a link records about its calibration (domains, counts, whether held-out data was allowed)."""
        return {"domains": self.domains, "counts": self.counts(), "allow_target": self.allow_target}


def calibration_data(datamodule: Any, images_per_domain: int = 64, allow_target: bool = False,
                     seed: int = 0) -> Calibration:  # fmt: skip
    """``images_per_domain`` seeded images from each source domain's ``in`` split (evaluation transform).

    Args:
        datamodule: the run's :class:`~dgkit.data.DGDataModule`.
        images_per_domain: images per domain (fewer when a domain has fewer).
        allow_target: also read the held-out domains (an analysis of what the protocol's honesty costs).
        seed: the draw's seed.

    Raises:
        ValueError: no data to calibrate on, or ``images_per_domain < 1``.
    """
    if datamodule is None:
        raise ValueError("this compression needs calibration data: run it after training or with scripts/compress.py")
    if images_per_domain < 1:
        raise ValueError(f"compress.calibration.images_per_domain={images_per_domain} must be >= 1")
    domains = list(datamodule.source_domains) + (list(datamodule.test_domains) if allow_target else [])
    images, labels = {}, {}
    for i, domain in enumerate(domains):
        dataset = datamodule.split(domain, "in")
        if len(dataset) == 0:
            continue
        generator = torch.Generator().manual_seed(seed * 1000 + i)
        picked = torch.randperm(len(dataset), generator=generator)[:images_per_domain].tolist()
        pairs = [dataset[j] for j in picked]
        images[domain] = torch.stack([x for x, _ in pairs])
        labels[domain] = torch.as_tensor([int(y) for _, y in pairs])
    if not images:
        raise ValueError(f"no calibration images: domains {domains} have empty training splits")
    return Calibration(images, labels, allow_target)


@dataclass
class InputStats:
    """Statistics of one layer's input over one domain's calibration images (channels on the last axis)."""

    abs_sum: torch.Tensor
    sq_sum: torch.Tensor
    rows: int = 0
    samples: list[torch.Tensor] = field(default_factory=list)

    @property
    def abs_mean(self) -> torch.Tensor:
        """Mean ``|x|`` per input channel (AWQ's activation scale ``s_X``)."""
        return self.abs_sum / max(self.rows, 1)

    @property
    def norm(self) -> torch.Tensor:
        """``||x_j||_2`` per input channel over every row seen (Wanda's activation norm)."""
        return self.sq_sum.sqrt()

    def sample(self) -> torch.Tensor:
        """The kept input rows ``(T, K)`` (empty when none were asked for)."""
        return torch.cat(self.samples) if self.samples else self.abs_sum.new_zeros(0, len(self.abs_sum))


def as_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer input as rows of input channels: ``(..., K)`` for linears, ``(B*H*W, C_in)`` for convolutions."""
    if isinstance(module, nn.Conv2d | nn.Conv1d):
        return x.movedim(1, -1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def collect_inputs(model: nn.Module, names: Sequence[str], calibration: Calibration, keep_rows: int = 0,
                   seed: int = 0, batch_size: int = 64) -> dict[str, dict[str, InputStats]]:  # fmt: skip
    """``{layer name: {domain: InputStats}}`` of the named submodules of ``model`` over the calibration images.

    Args:
        model: called on image batches (a method or an inference model), in eval mode for the pass.
        names: submodule names (``model.named_modules()``) whose inputs are recorded.
        keep_rows: keep up to this many seeded input rows per layer and domain (0: statistics only).
    """
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise KeyError(f"no submodules {missing} in {type(model).__name__}")
    stats: dict[str, dict[str, InputStats]] = {n: {} for n in names}
    current = {"domain": ""}
    generator = torch.Generator().manual_seed(seed)

    def hook(name: str, module: nn.Module):
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            rows = as_rows(module, inputs[0].detach().float())
            entry = stats[name].get(current["domain"])
            if entry is None:
                k = rows.shape[1]
                entry = stats[name][current["domain"]] = InputStats(rows.new_zeros(k), rows.new_zeros(k))
            entry.abs_sum += rows.abs().sum(0)
            entry.sq_sum += rows.square().sum(0)
            entry.rows += len(rows)
            have = sum(len(s) for s in entry.samples)
            if keep_rows and have < keep_rows:
                take = torch.randperm(len(rows), generator=generator)[: keep_rows - have]
                entry.samples.append(rows[take].clone())

        return record

    handles = [modules[n].register_forward_pre_hook(hook(n, modules[n])) for n in names]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        for domain, x, _ in calibration.batches(batch_size):
            current["domain"] = domain
            model(x.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return stats


COMBINATIONS = ("mean", "min", "weighted")


def combine_domains(scores: dict[str, torch.Tensor], how: str = "mean",
                    weights: dict[str, float] | None = None) -> torch.Tensor:  # fmt: skip
    """One importance tensor from per-domain ones, each first divided by its own mean (domains on one scale).

    ``mean``: the average; ``weighted``: the average with ``weights`` per domain; ``min``: every weight keeps its
    best score over the domains, so its pruning priority is the minimum over domains and a weight important to
    a single source domain survives (the DG-safe choice).

    Raises:
        ValueError: an unknown combination, or ``weighted`` without a weight for every domain.
    """
    if how not in COMBINATIONS:
        raise ValueError(f"combine={how!r}; choose one of {COMBINATIONS}")
    normalised = {d: s / s.mean().clamp(min=1e-12) for d, s in scores.items()}
    stacked = torch.stack(list(normalised.values()))
    if how == "mean":
        return stacked.mean(0)
    if how == "min":
        return stacked.amax(0)
    missing = [d for d in normalised if d not in (weights or {})]
    if missing:
        raise ValueError(f"combine=weighted needs a weight for every domain; missing {missing}")
    w = torch.tensor([float(weights[d]) for d in normalised], dtype=stacked.dtype, device=stacked.device)
    return (stacked * (w / w.sum())[:, None].reshape(-1, *([1] * (stacked.dim() - 1)))).sum(0)
