"""Run an export folder like an inference model: :func:`load_export` reads its manifest and opens the model file.

``onnx`` exports run in an ONNX Runtime CPU session (threads configurable); ``torch`` exports load the saved
``torch.export`` program. Either way the result is an :class:`ExportedModel`: a callable from a normalised image
batch to logits, with the ``data_config``, ``classes`` and ``task`` the manifest records, so prediction and
evaluation use it where they would use ``method.to_inference()``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from hydra.utils import instantiate

from dgkit.backbones.base import DataConfig
from dgkit.export.manifest import data_config, read_manifest
from dgkit.tasks import Task

RUNTIMES = ("onnxruntime", "torch.export")


def ort_session(model: str | Path | bytes, threads: int | None = 1) -> ort.InferenceSession:
    """A CPU ONNX Runtime session on a model file (or its bytes); ``threads``: intra-op threads (``None``: ORT's
    default)."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


class OrtModel:
    """An ONNX Runtime session as a tensor-to-tensor callable (its first input to its first output)."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.input = session.get_inputs()[0].name
        self.output = session.get_outputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output on ``x`` (float32, CPU)."""
        feed = {self.input: np.ascontiguousarray(x.detach().cpu().float().numpy())}
        return torch.from_numpy(self.session.run([self.output], feed)[0])


class ExportedModel:
    """An export folder opened for inference (see :func:`load_export`).

    Attributes:
        folder: the export folder.
        manifest: its validated manifest.
        data_config: the preprocessing (input size, mean, std, interpolation).
        classes: class names, in output order.
        task: the task (prediction rule, probabilities), instantiated from the manifest's config.
    """

    def __init__(self, folder: Path, manifest: dict[str, Any], runner: Any) -> None:
        self.folder = folder
        self.manifest = manifest
        self.data_config: DataConfig = data_config(manifest)
        self.classes: list[str] = list(manifest["classes"])
        self.task: Task = instantiate(manifest["task"])
        self._runner = runner

    @property
    def kind(self) -> str:
        """The export kind (``onnx``, ``torch``)."""
        return self.manifest["kind"]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` for a normalised image batch ``(B, C, H, W)``."""
        with torch.no_grad():
            return self._runner(x)

    def eval(self) -> ExportedModel:
        """No-op (an export has no training mode); returns itself, as ``nn.Module.eval`` does."""
        return self

    def __repr__(self) -> str:
        return f"ExportedModel({str(self.folder)!r}, kind={self.kind!r}, classes={len(self.classes)})"


def load_export(folder: str | Path, threads: int | None = None) -> ExportedModel:
    """Open an export folder written by ``scripts/export.py``.

    Args:
        folder: the export folder (holding ``manifest.json``).
        threads: ONNX Runtime intra-op threads (``None``: its default, every core).

    Raises:
        FileNotFoundError: no folder, no manifest, or a file it lists is missing.
        ValueError: a foreign or incomplete manifest, or an unknown runtime.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    runtime, path = manifest["model"]["runtime"], folder / manifest["model"]["file"]
    if runtime == "onnxruntime":
        runner = OrtModel(ort_session(path, threads))
    elif runtime == "torch.export":
        runner = torch.export.load(path).module()
    else:
        raise ValueError(f"{folder}: model runtime {runtime!r} is not one of {RUNTIMES}")
    return ExportedModel(folder, manifest, runner)
