"""Derived models of a run (compressed, exported) evaluated on every domain and written as run folders.

A variant is the selected model of a run after a post-training step: ``awq_w4`` (a compression link, evaluated
in PyTorch with fake-quant), ``onnx``/``onnx-awq_w4`` (an exported artifact run by ONNX Runtime). It is evaluated
on every domain's ``in`` and ``out`` split, exactly as training evaluated its checkpoints, and written to
``<run>/variants/<name>/`` as a run folder of its own: ``run.json`` (the parent's, with the variant's tag and
``choices["variant"]``), ``results.jsonl`` (one record at the parent's selected step), ``final.json``, ``done``.
So ``collect_results`` puts "fp32 eager / ORT fp32 / int8 / W4 / pruned" in rows of one table, under the same
per-fold selection as every other row: the variant has one candidate per run, the parent's selected step.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from dgkit.eval.records import DONE_FILE, RESULTS_FILE, RUN_FILE, VARIANTS_DIR
from dgkit.report import summarise_run
from dgkit.tasks import Task
from dgkit.utils.io import atomic_write_json, atomic_write_jsonl

SPLITS = ("in", "out")


@torch.inference_mode()
def evaluate_domains(
    predict: Callable[[torch.Tensor], torch.Tensor], task: Task, datamodule: Any, batch_size: int = 256
) -> dict[str, float]:
    """``{"<metric>/<domain>/<split>": score}`` of ``predict`` (normalised images to outputs) on every domain's
    ``in`` and ``out`` split, with the task's torchmetrics metric (as validation computes it)."""
    scores = {}
    for domain in datamodule.domains:
        for split in SPLITS:
            dataset = datamodule.split(domain, split)
            if len(dataset) == 0:
                continue
            metric = task.build_metric(datamodule.num_classes)
            for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
                task.update_metric(metric, predict(x), y)
            scores[f"{task.metric}/{domain}/{split}"] = float(metric.compute())
    return scores


def run_folder_of(ckpt: str | Path) -> Path | None:
    """The run folder a checkpoint belongs to (``<run>/checkpoints/x.ckpt`` or ``<run>/variants/<v>/model.ckpt``
    → ``<run>``), or ``None`` when it is not inside one."""
    path = Path(ckpt).resolve()
    for parent in path.parents:
        if (parent / RUN_FILE).exists() and parent.parent.name != VARIANTS_DIR:
            return parent
    return None


def write_variant(run_dir: Path, name: str, label: str, scores: dict[str, float], extra: dict[str, Any]) -> Path:
    """Write ``<run_dir>/variants/<name>/`` as a finished run folder; return it.

    Args:
        run_dir: the parent run folder (its ``run.json`` and ``final.json`` give tag, domains and selected step).
        name: the folder name; label: appended to the parent's tag (``ERM+AWQ-W4``).
        scores: :func:`evaluate_domains`' output.
        extra: merged into ``final.json`` (what the step changed, scores before it, calibration).
    """
    parent = json.loads((run_dir / RUN_FILE).read_text())
    final_path = run_dir / "final.json"
    step = json.loads(final_path.read_text())["step"] if final_path.exists() else 0
    metric = parent.get("metric", "acc")
    folder = run_dir / VARIANTS_DIR / name
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / DONE_FILE
    done.unlink(missing_ok=True)
    info = {
        **parent,
        "tag": f"{parent.get('tag', 'run')}+{label}",
        "choices": {**parent.get("choices", {}), "variant": name},
        "variant_of": str(run_dir),
    }
    atomic_write_json(folder / RUN_FILE, info)
    atomic_write_jsonl(folder / RESULTS_FILE, [{**scores, "epoch": 0, "step": step}])
    final = summarise_run([{**scores, "step": step}], parent["domains"], parent["test_domains"], metric,
                          parent.get("metric_name", metric))  # fmt: skip
    final.update(info, **extra)
    atomic_write_json(folder / "final.json", final)
    done.touch()
    return folder


def format_variant(folder: Path) -> str:
    """A variant folder's scores per domain (``in`` split, held-out domains marked) and its path."""
    final = json.loads((Path(folder) / "final.json").read_text())
    lines = [f"{final['tag']}: {final['metric_name']} ('in' split; * held-out)"]
    for domain in final["domains"]:
        mark = "*" if domain in final["test_domains"] else ""
        lines.append(f"  {domain + mark:<14} {100 * final['scores'][domain]['in']:6.1f}")
    return "\n".join([*lines, f"wrote {folder}"])
