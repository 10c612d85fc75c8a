"""Compress a trained checkpoint and measure what it cost, per domain: ``scripts/compress.py`` and
``train.py ... compress=NAME`` both run :func:`compress_checkpoint`.

The checkpoint is rebuilt with its benchmark, evaluated on every domain's ``in``/``out`` split, compressed by one
chain link (calibrated on the source domains' training images only, unless the link allows the held-out ones),
evaluated again, and written to ``<run>/variants/<name>/``: ``model.ckpt`` (reloads: the chain replays), the
report (what the link changed; scores before and after) in ``final.json``, and the run-folder files that put
the compressed model in ``collect_results``' tables as a row ``<tag>+<NAME>``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from dgkit.checkpoint import load_checkpoint_and_data, save_model_checkpoint
from dgkit.compose import apply_after_fit
from dgkit.search import without_search
from dgkit.utils.io import atomic_write_json, jsonable
from dgkit.variants import evaluate_domains, run_folder_of, write_variant

log = logging.getLogger(__name__)


def compress_name(config: Any) -> str:
    """The variant name of a compression config: its ``name``, else the ``compress`` choice under Hydra
    (``awq_w4``), else the link's class name in lower case."""
    if config.get("name"):
        return str(config["name"])
    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get("compress")
        if choice and choice != "none":
            return str(choice)
    return str(config.get("_target_", "compress")).rsplit(".", 1)[-1].lower()


def variant_label(name: str, record: dict[str, Any]) -> str:
    """The tag suffix of a compressed variant: its name in capitals (``AWQ-W4``); a calibration that read the
    held-out domains is marked ``[target-calib]`` so no table shows it as a DG result."""
    label = name.upper().replace("_", "-")
    if (((record.get("state") or {}).get("calibration")) or {}).get("allow_target"):
        label += "[target-calib]"
    return label


def compress_checkpoint(
    ckpt: str | Path, config: Any, name: str, out: str | Path | None = None, data_paths: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Compress ``ckpt`` with the link ``config`` (a ``conf/compress`` entry); write and return its report.

    Args:
        ckpt: a dgkit checkpoint (a run's ``best.ckpt``, or a variant's ``model.ckpt`` to chain compressions).
        config: the link's config (``_target_`` and its arguments).
        name: the variant's name (the ``compress`` choice, ``awq_w4``): its folder and table label.
        out: the variant folder (default ``<run>/variants/<name>``).
        data_paths: ``{"data.root": ..., "paths.datasets": ...}`` when the benchmark moved since training.

    Returns:
        ``{"folder", "checkpoint", "label", "report", "before", "after"}``.

    Raises:
        ValueError: a method with no trained head (SimCLR: train a linear probe first), a bad layer list.
    """
    config = without_search(OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config) else config)
    overrides = {k: v for k, v in (data_paths or {}).items() if v}
    cfg, datamodule, method = load_checkpoint_and_data(ckpt, overrides)
    task = method.task
    before = evaluate_domains(method.to_inference(), task, datamodule)  # SimCLR refuses here, saying what to do
    records = apply_after_fit([config], method, datamodule)
    if not records:
        raise ValueError(f"compress={name}: {config.get('_target_')} is not an after_fit link (a compression)")
    after = evaluate_domains(method.to_inference(), task, datamodule)
    run_dir = run_folder_of(ckpt)
    folder = Path(out) if out else (run_dir / "variants" / name if run_dir else None)
    if folder is None:
        raise ValueError(f"{ckpt} is not inside a run folder: give out=DIR for the compressed checkpoint")
    checkpoint = save_model_checkpoint(folder / "model.ckpt", OmegaConf.to_container(cfg), method)
    state = records[0].get("state") or {}
    label = variant_label(name, records[0])
    report = {
        "name": name,
        "config": config,
        "report": jsonable(state.get("report", {}), max_items=64),
        "calibration": jsonable(state.get("calibration"), max_items=64),
        "before": before,
        "checkpoint": str(checkpoint),
    }
    if out is None:  # the run's own variant folder: a row of its result tables
        write_variant(run_dir, name, label, after, {"compress": report})
    else:
        atomic_write_json(folder / "report.json", {**report, "after": after, "label": label})
    log.info("compressed %s with %s: %s", ckpt, name, checkpoint)
    return {"folder": str(folder), "checkpoint": str(checkpoint), "label": label, "report": report["report"],
            "before": before, "after": after}  # fmt: skip


def format_change(result: dict[str, Any], test_domains: list[str], metric: str) -> str:
    """A per-domain table of the score before and after compression (``in`` split), held-out domains marked,
    and the mean change over held-out and over source domains."""
    lines = [f"{result['label']}: {metric} before -> after ('in' split; * held-out)"]
    deltas: dict[bool, list[float]] = {True: [], False: []}
    for key, after in result["after"].items():
        _, domain, split = key.split("/")
        if split != "in":
            continue
        before = result["before"][key]
        held_out = domain in test_domains
        deltas[held_out].append(after - before)
        lines.append(f"  {domain + ('*' if held_out else ''):<14} {100 * before:6.1f} -> {100 * after:6.1f} "
                     f"({100 * (after - before):+.1f})")  # fmt: skip
    for held_out, values in deltas.items():
        if values:
            lines.append(f"  mean change on {'held-out' if held_out else 'source'} domains: "
                         f"{100 * sum(values) / len(values):+.2f} points")  # fmt: skip
    return "\n".join(lines)
