"""One TTA evaluation of a checkpoint, end to end: rebuild the run, build the test sets, evaluate with and
without the TTA, write the result file atomically. Shared by ``scripts/evaluate.py`` and ``train.py tta=...``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dgkit.checkpoint import load_checkpoint_and_data
from dgkit.tta.base import TestTimeAdapter
from dgkit.tta.evaluate import build_test_sets, evaluate_tta
from dgkit.utils.io import atomic_write_json


def default_result_path(ckpt: str | Path, tta: TestTimeAdapter, split: str = "in", corrupted: bool = False) -> Path:
    """``<run folder>/tta/<tta>_bs<batch size>[_<split>][_c].json`` for a run's ``checkpoints/<name>.ckpt``."""
    suffix = ("" if split == "in" else f"_{split}") + ("_c" if corrupted else "")
    return Path(ckpt).resolve().parents[1] / "tta" / f"{tta.name}_bs{tta.batch_size}{suffix}.json"


def run_tta(
    ckpt: str | Path,
    tta: TestTimeAdapter,
    tta_config: dict[str, Any] | None = None,
    domains: Sequence[str] | None = None,
    split: str = "in",
    seed: int = 0,
    corrupt: dict[str, Any] | None = None,
    data_paths: dict[str, str] | None = None,
    out: str | Path | None = None,
) -> tuple[dict[str, Any], Path]:
    """Evaluate ``ckpt`` with and without ``tta``; return the result and the file it was written to.

    Args:
        ckpt: a checkpoint written by ``train.py`` (it stores its resolved config).
        tta: the unbound TTA (``instantiate(cfg.tta)``); tta_config: its config, recorded with the result.
        domains, split, corrupt: the test sets (:func:`~dgkit.tta.evaluate.build_test_sets`).
        seed: the test stream's order.
        data_paths: ``{"data.root": ..., "paths.datasets": ...}``: where the benchmark lives, if it moved since
            training (see :func:`dgkit.checkpoint.load_checkpoint`).
        out: the result file (default :func:`default_result_path`).
    """
    overrides = {k: v for k, v in (data_paths or {}).items() if v}
    _, datamodule, method = load_checkpoint_and_data(ckpt, overrides)
    sets = build_test_sets(datamodule, domains, split, corrupt)
    result = evaluate_tta(method, datamodule, tta, sets, seed=seed, split=split)
    result.update(
        ckpt=str(Path(ckpt).resolve()), split=split, tta_config=tta_config or {}, corrupt=corrupt or {},
        dataset=datamodule.name, test_domains=list(datamodule.test_domains),
    )  # fmt: skip
    path = Path(out) if out else default_result_path(ckpt, tta, split, bool(corrupt and corrupt.get("severities")))
    atomic_write_json(path, result)
    return result, path


def result_metric(result: dict[str, Any]) -> tuple[str, str]:
    """``(record key, display name)`` of the metric a result was scored with (``acc``/accuracy for results
    written before tasks named it)."""
    return result.get("metric", "acc"), result.get("metric_name", "accuracy")


def format_result(result: dict[str, Any]) -> str:
    """A plain-text table of one evaluation (the task's metric in %, and times)."""
    key, name = result_metric(result)
    lines = [
        f"tta={result['tta']} batch_size={result['batch_size']} reset={result['reset']} split={result.get('split')} "
        f"metric={name} (%)",
        f"{'test set':<28}{'none %':>8}{'tta %':>8}{'ms/img none':>13}{'ms/img tta':>12}",
    ]
    for set_name, row in result["sets"].items():
        lines.append(
            f"{set_name:<28}{100 * row[f'{key}_none']:8.1f}{100 * row[f'{key}_tta']:8.1f}"
            f"{row['ms_per_image_none']:13.3f}{row['ms_per_image_tta']:12.3f}"
        )
    lines.append(
        f"{'mean':<28}{100 * result[f'mean_{key}_none']:8.1f}{100 * result[f'mean_{key}_tta']:8.1f}"
        f"   time ratio (tta / none) {result['time_ratio']:.2f}"
    )
    return "\n".join(lines)
