"""Evaluate a trained checkpoint with and without a test-time adaptation, domain by domain.

The checkpoint carries its resolved run config (``dgkit_config``), so :func:`load_checkpoint` rebuilds the same
data, backbone (with its adapter) and method, then loads the weights. :func:`evaluate_tta` streams each test
domain's ``in`` split (the split the result tables report) in a fixed seeded order, in batches of
``tta.batch_size``, through the source model and through the TTA, resetting the TTA per its policy.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

from dgkit.callbacks import CONFIG_KEY
from dgkit.tta.base import TestTimeAdapter


def load_checkpoint(path: str | Path, overrides: dict[str, Any] | None = None):
    """``(config, datamodule, method)`` rebuilt from a dgkit checkpoint, weights loaded, in eval mode.

    Pretrained-weight sources (``backbone.weights``, ``backbone.pretrained``) are switched off: the checkpoint
    holds every weight. ``overrides`` (dotted keys) change the stored config, e.g. ``{"data.root": ...}``.
    """
    from dgkit.run import build  # the composition root; imported here to keep this module light

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist (expected a run's checkpoints/best.ckpt or last.ckpt)"
        )
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if CONFIG_KEY not in ckpt:
        raise ValueError(f"{path} has no '{CONFIG_KEY}': not a checkpoint written by dgkit's train.py")
    cfg = OmegaConf.create(ckpt[CONFIG_KEY])
    if "backbone" in cfg:
        for key, value in (("weights", None), ("pretrained", False)):
            if key in cfg.backbone:
                cfg.backbone[key] = value
    for key, value in (overrides or {}).items():
        OmegaConf.update(cfg, key, value, force_add=True)
    datamodule, method = build(cfg)
    method.load_state_dict(ckpt["state_dict"])
    return cfg, datamodule, method.eval()


def source_batches(datamodule, batch_size: int) -> DataLoader:
    """Every labelled source image (``in`` and ``out`` splits, evaluation transform), in benchmark order."""
    from torch.utils.data import ConcatDataset

    parts = [datamodule.split(d, s) for d in datamodule.source_domains for s in ("in", "out")]
    return DataLoader(ConcatDataset(parts), batch_size=batch_size, shuffle=False)


def stream(dataset: Dataset, batch_size: int, seed: int) -> DataLoader:
    """The test stream: ``dataset`` in a fixed order drawn from ``seed``; an empty dataset is an error."""
    if len(dataset) == 0:
        raise ValueError("a test domain with no images cannot be evaluated (an empty domain is not 0 % accuracy)")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)


def _run(predict, loader: DataLoader, grad: bool, before_batch=None) -> tuple[float, float, int]:
    """``(accuracy, seconds, images)`` of ``predict`` over ``loader``."""
    correct, seen, seconds = 0, 0, 0.0
    for x, y in loader:
        if before_batch is not None:
            before_batch()
        start = time.perf_counter()
        if grad:
            with torch.enable_grad():
                scores = predict(x)
        else:
            with torch.inference_mode():
                scores = predict(x)
        seconds += time.perf_counter() - start
        correct += int((scores.argmax(1) == y).sum())
        seen += len(y)
    return correct / seen, seconds, seen


def evaluate_tta(
    method, datamodule, tta: TestTimeAdapter, domains: Sequence[str] | None = None, seed: int = 0,
    datasets: dict[str, Dataset] | None = None,
) -> dict[str, Any]:
    """Accuracy and time per image of the source model and of ``tta`` on each test domain.

    Args:
        method: a trained :class:`~dgkit.methods.base.Method` (``backbone`` + ``classifier``).
        datamodule: its :class:`~dgkit.data.DGDataModule` (source memory and the test splits).
        tta: an unbound TTA; it is bound to copies of the model here.
        domains: test domains (default: the run's held-out domains), each evaluated on its ``in`` split.
        seed: the stream order's seed.
        datasets: extra named test sets (e.g. corrupted domains) evaluated after ``domains``.
    """
    domains = list(domains if domains is not None else datamodule.test_domains)
    unknown = [d for d in domains if d not in datamodule.domains]
    if unknown:
        raise ValueError(f"unknown test domain(s) {unknown}; this run's domains are {datamodule.domains}")
    sets = {d: datamodule.split(d, "in") for d in domains}
    sets.update(datasets or {})
    method.eval()
    tta.bind(method.backbone, method.classifier, source_batches(datamodule, 256))
    per_domain: dict[str, Any] = {}
    for name, dataset in sets.items():
        if tta.reset_policy == "per_domain":
            tta.reset()
        base_acc, base_s, n = _run(method, stream(dataset, tta.batch_size, seed), grad=False)
        before = tta.reset if tta.reset_policy == "per_batch" else None
        loader = stream(dataset, tta.batch_size, seed)
        acc, secs, _ = _run(tta.predict, loader, grad=tta.needs_grad, before_batch=before)
        per_domain[name] = {
            "images": n, "acc_none": base_acc, "acc_tta": acc,
            "ms_per_image_none": 1e3 * base_s / n, "ms_per_image_tta": 1e3 * secs / n,
        }  # fmt: skip
    return {
        "tta": tta.name, "batch_size": tta.batch_size, "reset": tta.reset_policy, "seed": seed,
        "domains": per_domain,
        "mean_acc_none": sum(v["acc_none"] for v in per_domain.values()) / len(per_domain),
        "mean_acc_tta": sum(v["acc_tta"] for v in per_domain.values()) / len(per_domain),
    }  # fmt: skip
