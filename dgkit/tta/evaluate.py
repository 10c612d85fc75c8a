"""Evaluate a trained model with and without a test-time adaptation, test set by test set.

Each test set (a held-out domain's ``in`` split by default, the split result tables report, and optionally its
corrupted copies, ``digits_c``) streams in a fixed order drawn from ``seed``, in batches of ``tta.batch_size``,
through the source model and through the TTA, which is reset per its policy, and is scored with the run's task
metric (``Task.build_metric`` / ``Task.update_metric``: accuracy, or mIoU for segmentation). A plain loop rather than
Lightning's test loop: a TTA is stateful and order-dependent, and this keeps the order, the resets and the
grad/no-grad switch in one visible place (gradient TTAs run under ``torch.enable_grad``, the rest under
``torch.inference_mode``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from dgkit.data.corruptions import corrupted_sets
from dgkit.data.datamodule import TransformedDataset
from dgkit.data.transforms import build_transform
from dgkit.tasks import Task
from dgkit.tta.base import TestTimeAdapter

log = logging.getLogger(__name__)


def build_test_sets(
    datamodule, domains: Sequence[str] | None = None, split: str = "in", corrupt: dict[str, Any] | None = None
) -> dict[str, Dataset]:
    """``{name: dataset}`` to evaluate: ``split`` of each of ``domains`` (default: the held-out ones), then, with
    ``corrupt`` (``names``, ``severities``, ``max_images``, ``seed``; see ``conf/corrupt/``), each domain's
    split under every corruption and severity, named ``<domain>/<corruption>-<severity>``.

    Raises:
        ValueError: an unknown domain or split, or an empty test set (an empty domain is not 0 % accuracy).
    """
    domains = list(domains) if domains else list(datamodule.test_domains)
    unknown = [d for d in domains if d not in datamodule.domains]
    if unknown:
        raise ValueError(f"unknown test domain(s) {unknown}; this run's domains are {datamodule.domains}")
    if split not in ("in", "out", "all"):
        raise ValueError(f"split={split!r}; choose in, out or all")
    transform = build_transform(datamodule.data_config, datamodule.augment, train=False)
    sets: dict[str, Dataset] = {}
    for d in domains:
        raw = datamodule.benchmark.datasets[d]
        if split != "all":
            raw = torch.utils.data.Subset(raw, datamodule.splits[(d, split)].tolist())
        if len(raw) == 0:
            raise ValueError(f"test domain {d!r} ({split} split) has no images: an empty domain is not 0 % accuracy")
        sets[d] = TransformedDataset(raw, transform)
        if corrupt and corrupt.get("severities"):
            extra = corrupted_sets(
                raw, datamodule.name, d, str(datamodule.root or "datasets"), corrupt.get("names"),
                corrupt["severities"], corrupt.get("max_images"), int(corrupt.get("seed", 0)),
            )  # fmt: skip
            sets.update({name: TransformedDataset(ds, transform) for name, ds in extra.items()})
    return sets


def source_batches(datamodule, exclude: Sequence[tuple[str, str]] = (), batch_size: int = 256) -> DataLoader:
    """Every labelled source image (``in`` and ``out`` splits, evaluation transform) except the ``(domain, split)``
    pairs being evaluated (source-validation runs must not find their own images in AdaNPC's memory)."""
    parts = [
        datamodule.split(d, s)
        for d in datamodule.source_domains
        for s in ("in", "out")
        if (d, s) not in set(exclude) and len(datamodule.splits[(d, s)]) > 0
    ]
    return DataLoader(ConcatDataset(parts), batch_size=batch_size, shuffle=False)


def stream(dataset: Dataset, batch_size: int, seed: int) -> DataLoader:
    """The test stream: ``dataset`` in a fixed order drawn from ``seed``; an empty dataset is an error."""
    if len(dataset) == 0:
        raise ValueError("a test domain with no images cannot be evaluated (an empty domain is not 0 % accuracy)")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)


def run_stream(
    predict: Callable[[torch.Tensor], torch.Tensor],
    loader: DataLoader,
    grad: bool,
    device: torch.device,
    task: Task,
    num_classes: int,
    before_batch: Callable[[], None] | None = None,
) -> tuple[float, float, int]:
    """``(score, seconds spent in predict, images)`` of ``predict`` over ``loader``: the score is the task's own
    metric (``task.build_metric``: accuracy for classification, mIoU over every pixel of the stream for
    segmentation), accumulated batch by batch with ``task.update_metric``."""
    metric = task.build_metric(num_classes).to(device)
    seen, seconds = 0, 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        if before_batch is not None:
            before_batch()
        start = time.perf_counter()
        with torch.enable_grad() if grad else torch.inference_mode():
            scores = predict(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start
        with torch.inference_mode():
            task.update_metric(metric, scores.detach(), y)
        seen += len(y)
    return float(metric.compute()), seconds, seen


def evaluate_tta(
    method, datamodule, tta: TestTimeAdapter, sets: dict[str, Dataset] | None = None, seed: int = 0,
    baseline: bool = True, split: str = "in",
) -> dict[str, Any]:  # fmt: skip
    """The task's metric and time per image of the source model (``baseline``) and of ``tta`` on each test set.

    The result names the metric (``metric``: the task's record key, ``acc`` or ``miou``; ``metric_name``) and
    its keys carry it: ``<metric>_none`` and ``<metric>_tta`` per set, ``mean_<metric>_none`` and
    ``mean_<metric>_tta`` (``acc_none``, ``acc_tta``... for classification, as before tasks existed).

    Args:
        method: a trained :class:`~dgkit.methods.base.Method` (``backbone`` + ``classifier``, or its own
            ``tta_model()``); left unchanged.
        datamodule: its :class:`~dgkit.data.DGDataModule` (source memory, test splits).
        tta: an unbound TTA; it is bound here to copies of the model (before any test image is read, so a TTA
            that does not fit the model fails early).
        sets: ``{name: dataset}`` from :func:`build_test_sets` (default: the held-out domains' ``in`` splits).
        seed: the stream order's seed (the same order for the baseline and the TTA).
        baseline: also evaluate the unadapted model (``<metric>_none``, ``ms_per_image_none``).
        split: the split ``sets`` were taken from; those (domain, split) pairs stay out of the source memory.
    """
    sets = sets if sets is not None else build_test_sets(datamodule)
    method.eval()
    task, num_classes = method.task, int(method.hparams.num_classes)
    key = task.metric
    evaluated = [(name, s) for name in sets for s in ("in", "out") if split in (s, "all")]
    start = time.perf_counter()
    tta.bind_method(method, source_batches(datamodule, exclude=evaluated))
    bind_seconds = time.perf_counter() - start
    device = tta.device
    per_set: dict[str, Any] = {}
    for name, dataset in sets.items():
        row: dict[str, Any] = {"images": len(dataset)}
        if baseline:
            score, secs, n = run_stream(method, stream(dataset, tta.batch_size, seed), False, device, task, num_classes)
            row.update({f"{key}_none": score, "ms_per_image_none": 1e3 * secs / n})
        if tta.reset_policy == "per_domain":
            tta.reset()
        before = tta.reset if tta.reset_policy == "per_batch" else None
        loader = stream(dataset, tta.batch_size, seed)
        score, secs, n = run_stream(tta.predict, loader, tta.needs_grad, device, task, num_classes, before)
        row.update({f"{key}_tta": score, "ms_per_image_tta": 1e3 * secs / n})
        if baseline:
            row.update(added_ms_per_image=row["ms_per_image_tta"] - row["ms_per_image_none"])
        per_set[name] = row
        log.info("%s: %s", name, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    result: dict[str, Any] = {
        "tta": tta.name, "batch_size": tta.batch_size, "reset": tta.reset_policy, "seed": seed,
        "needs_grad": tta.needs_grad, "bind_seconds": bind_seconds, "task": task.name, "metric": key,
        "metric_name": task.metric_name, "sets": per_set,
        f"mean_{key}_tta": sum(v[f"{key}_tta"] for v in per_set.values()) / len(per_set),
    }  # fmt: skip
    if baseline:
        result[f"mean_{key}_none"] = sum(v[f"{key}_none"] for v in per_set.values()) / len(per_set)
        none_ms = sum(v["ms_per_image_none"] for v in per_set.values())
        result["time_ratio"] = sum(v["ms_per_image_tta"] for v in per_set.values()) / none_ms
    return result
