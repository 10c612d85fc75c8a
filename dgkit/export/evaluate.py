"""Evaluate an export folder on every domain, as a row of the run's result tables.

The artifact (ONNX Runtime session or ``torch.export`` program) is run on every domain's ``in``/``out`` split of
the benchmark its source checkpoint trained on, and written as ``<run>/variants/<export folder name>/``
(:mod:`dgkit.variants`), tagged ``<run tag>+ORT-FP32``, ``+ORT-AWQ-W4``, ``+PT2-FP32``... So eager fp32, ORT
fp32, int8, W4 and pruned models are rows of one ``collect_results`` table, selected per fold like any run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dgkit.checkpoint import load_checkpoint_and_data
from dgkit.export.runtime import load_export
from dgkit.variants import evaluate_domains, run_folder_of, write_variant

RUNTIME_LABELS = {"onnx": "ORT", "torch": "PT2"}


def export_label(manifest: dict[str, Any]) -> str:
    """The tag suffix of an export: runtime, then the compression links (``ORT-AWQ-W4``) or ``FP32``."""
    links = [str((link.get("config") or {}).get("name") or "") for link in manifest.get("chain", [])]
    links = [n.upper().replace("_", "-") for n in links if n]
    runtime = RUNTIME_LABELS.get(manifest["kind"], manifest["kind"].upper())
    target = any((c or {}).get("allow_target") for c in manifest.get("calibration", []))
    return "-".join([runtime, *(links or ["FP32"])]) + ("[target-calib]" if target else "")


def evaluate_export(folder: str | Path, data_paths: dict[str, Any] | None = None, threads: int | None = 1) -> Path:
    """Evaluate the export in ``folder`` on every domain; write and return its variant folder.

    Raises:
        FileNotFoundError / ValueError: a missing or foreign manifest, a source checkpoint that moved or whose
            benchmark is not found (pass ``data.root=``), or a source checkpoint outside a run folder.
    """
    model = load_export(folder, threads=threads)
    source = model.manifest.get("source", {}).get("checkpoint")
    if not source:
        raise ValueError(f"{folder}/manifest.json names no source checkpoint: cannot find the benchmark to evaluate on")
    run_dir = run_folder_of(source)
    if run_dir is None:
        raise ValueError(f"{folder}: its source checkpoint {source} is not inside a run folder")
    overrides = {k: v for k, v in (data_paths or {}).items() if v}
    _, datamodule, _ = load_checkpoint_and_data(source, overrides)
    scores = evaluate_domains(model, model.task, datamodule)
    extra = {
        "export": {"folder": str(Path(folder).resolve()), "kind": model.kind, "parity": model.manifest.get("parity")}
    }
    return write_variant(run_dir, Path(folder).name, export_label(model.manifest), scores, extra)
