"""Parity of an exported model with its PyTorch reference, on real images of every domain (``parity.json``).

:func:`parity_images` draws a seeded batch from the ``in`` and ``out`` split of every domain, source and held-out,
through the evaluation pipeline. :func:`check` compares a runtime's logits with a reference's on it: the largest
absolute difference, the relative L2 error and the top-1 agreement, per ``domain/split`` and overall, against
thresholds. Two checks gate an export (:class:`ParityThresholds`):

* the runtime's float graph against eager ``to_inference()``: ``max |Δlogit| <= 1e-4`` and 100 % top-1;
* the quantised runtime (``MatMulNBits``) against the PyTorch fake-quant reference (the compressed model's
  ``to_inference()``): top-1 agreement >= 99 % (and optionally a relative L2 bound). This isolates kernel and
  packing bugs from quantisation error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

SPLITS = ("in", "out")


class ParityError(RuntimeError):
    """An exported model disagrees with its reference beyond the thresholds."""


@dataclass
class ParityThresholds:
    """Gates of an export (see the module docstring).

    Attributes:
        max_abs_diff: largest |Δlogit| of the float runtime against eager.
        top1: top-1 agreement of the float runtime against eager (1.0 = every image).
        quantised_top1: top-1 agreement of the quantised runtime against the fake-quant reference.
        quantised_rel_l2: bound on the quantised runtime's relative L2 error (``None``: reported only).
    """

    max_abs_diff: float = 1e-4
    top1: float = 1.0
    quantised_top1: float = 0.99
    quantised_rel_l2: float | None = None

    def __post_init__(self) -> None:
        for name in ("top1", "quantised_top1"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"parity {name}={getattr(self, name)} must lie in [0, 1]")

    def float_limits(self) -> dict[str, float]:
        """The limits of the float check."""
        return {"max_abs_diff": self.max_abs_diff, "top1_agreement": self.top1}

    def quantised_limits(self) -> dict[str, float]:
        """The limits of the quantised check."""
        limits = {"top1_agreement": self.quantised_top1}
        if self.quantised_rel_l2 is not None:
            limits["rel_l2"] = self.quantised_rel_l2
        return limits

    def record(self) -> dict[str, Any]:
        """The thresholds as a dict (for ``parity.json``)."""
        return asdict(self)


def parity_images(datamodule: Any, per_domain: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """``{"<domain>/<split>": images}``: about ``per_domain`` seeded images per domain, half from each of its
    ``in`` and ``out`` splits (fewer when a split is smaller), evaluation pipeline.

    Raises:
        ValueError: ``per_domain < 1`` or no image at all.
    """
    if per_domain < 1:
        raise ValueError(f"parity images per domain={per_domain} must be >= 1")
    per_split = math.ceil(per_domain / len(SPLITS))
    batches = {}
    for i, domain in enumerate(datamodule.domains):
        for j, split in enumerate(SPLITS):
            dataset = datamodule.split(domain, split)
            if len(dataset) == 0:
                continue
            generator = torch.Generator().manual_seed(seed * 1000 + 10 * i + j)
            picked = torch.randperm(len(dataset), generator=generator)[:per_split].tolist()
            batches[f"{domain}/{split}"] = torch.stack([dataset[k][0] for k in picked])
    if not batches:
        raise ValueError(f"no parity images: every split of {list(datamodule.domains)} is empty")
    return batches


@torch.no_grad()
def outputs(model: Callable[[torch.Tensor], torch.Tensor], images: dict[str, torch.Tensor],
            batch_size: int = 32) -> dict[str, torch.Tensor]:  # fmt: skip
    """``model``'s outputs on every group of ``images``, in batches."""
    return {
        group: torch.cat([model(x[s : s + batch_size]).float() for s in range(0, len(x), batch_size)])
        for group, x in images.items()
    }


def compare(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """``max_abs_diff``, ``rel_l2`` (``||Δ|| / ||reference||``) and ``top1_agreement`` of two logit batches."""
    diff = (candidate.double() - reference.double()).reshape(len(reference), -1)
    ref = reference.double().reshape(len(reference), -1)
    return {
        "images": len(reference),
        "max_abs_diff": float(diff.abs().max()) if diff.numel() else 0.0,
        "rel_l2": float(diff.norm() / ref.norm().clamp(min=1e-30)),
        "top1_agreement": float((candidate.argmax(-1) == reference.argmax(-1)).double().mean()),
    }


def _passes(stats: dict[str, float], limits: dict[str, float]) -> list[str]:
    """The limits ``stats`` breaks, as readable strings."""
    broken = []
    for key, limit in limits.items():
        value = stats[key]
        ok = value >= limit if key == "top1_agreement" else value <= limit
        if not ok:
            broken.append(f"{key} {value:.3g} {'<' if key == 'top1_agreement' else '>'} {limit:.3g}")
    return broken


def check(name: str, reference: dict[str, torch.Tensor], candidate: dict[str, torch.Tensor],
          limits: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    """One parity check: overall and per-group statistics, the limits, and whether it passed."""
    groups = {g: compare(reference[g], candidate[g]) for g in reference}
    overall = compare(torch.cat(list(reference.values())), torch.cat(list(candidate.values())))
    failures = _passes(overall, limits)
    return {"name": name, **overall, "limits": limits, "passed": not failures, "failures": failures,
            "groups": groups}  # fmt: skip


def report(checks: list[dict[str, Any]], thresholds: ParityThresholds, images: dict[str, torch.Tensor],
           seed: int) -> dict[str, Any]:  # fmt: skip
    """``parity.json``: every check, the thresholds, the images used, and whether all passed."""
    return {
        "passed": all(c["passed"] for c in checks),
        "checks": checks,
        "thresholds": thresholds.record(),
        "images": {g: len(x) for g, x in images.items()},
        "seed": seed,
    }


def failure_message(parity: dict[str, Any]) -> str:
    """A one-paragraph account of the failed checks of a ``parity.json`` dict."""
    failed = [f"{c['name']}: {'; '.join(c['failures'])}" for c in parity["checks"] if not c["passed"]]
    return "export parity failed (" + " | ".join(failed) + "); nothing was written"
