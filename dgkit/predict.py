"""Predict with a trained model on image files: the checkpoint's own preprocessing, no dataset needed.

:func:`predict_checkpoint` rebuilds the model from a checkpoint (:func:`dgkit.checkpoint.load_checkpoint`),
takes :meth:`~dgkit.methods.base.Method.to_inference` (adapters merged, training-only parts dropped), applies the
evaluation pipeline built from the stored ``data_config`` (resize + normalise, as validation did) and writes
``predictions.csv`` with one row per image: ``path, class, probability``. Given an export folder instead
(``scripts/export.py``: a directory with ``manifest.json``), it runs the exported model
(:func:`dgkit.export.runtime.load_export`) with the manifest's preprocessing, classes and task; the CSV is the same.
``scripts/predict.py`` is its command.
"""

from __future__ import annotations

import csv
import glob
import io
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from dgkit.backbones.base import DataConfig
from dgkit.checkpoint import load_checkpoint
from dgkit.data.folder import IMAGE_EXTENSIONS, read_image
from dgkit.data.transforms import build_transform
from dgkit.export.runtime import load_export
from dgkit.tasks import Task
from dgkit.utils.io import atomic_write_text

CSV_COLUMNS = ("path", "class", "probability")


def find_images(spec: str | Path) -> list[Path]:
    """The image files named by ``spec``: a folder (searched recursively), a glob pattern or one file; sorted.

    Raises:
        FileNotFoundError: nothing matches, with the accepted forms and extensions.
    """
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(str(spec), recursive=True) if Path(p).is_file())
    if not files:
        raise FileNotFoundError(
            f"images={spec}: no image files found (give a folder, a glob such as 'dir/*.png', or a file; "
            f"extensions {', '.join(IMAGE_EXTENSIONS)})"
        )
    return files


def data_config_from_meta(stored: dict) -> DataConfig:
    """The :class:`DataConfig` a checkpoint stored (lists back to tuples)."""
    return DataConfig(
        input_size=tuple(stored["input_size"]),
        mean=tuple(stored["mean"]),
        std=tuple(stored["std"]),
        interpolation=stored.get("interpolation", "bilinear"),
        extra=dict(stored.get("extra") or {}),
    )


@torch.no_grad()
def predict_files(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    task: Task,
    data_config: DataConfig,
    files: Sequence[Path],
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(predicted classes (N,), their probabilities (N,))`` of ``model`` on image files.

    Args:
        model: an inference module (normalised images to the task's outputs), in eval mode, or an exported model.
        task: the task whose prediction rule and probabilities apply.
        data_config: the preprocessing (the checkpoint's).
        files: image paths; an unreadable one raises naming the file.
        batch_size: images per forward pass.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    transform = build_transform(data_config, "none", train=False)
    classes, probabilities = [], []
    for start in range(0, len(files), batch_size):
        x = torch.stack([transform(image=read_image(f))["image"] for f in files[start : start + batch_size]])
        outputs = model(x)
        predicted = task.predict(outputs)  # (B,)
        classes.append(predicted)
        probabilities.append(task.probabilities(outputs).gather(-1, predicted[:, None])[:, 0])
    return torch.cat(classes), torch.cat(probabilities)


def predictions_csv(files: Sequence[Path], classes: torch.Tensor, probabilities: torch.Tensor, names: list[str]) -> str:
    """The CSV text: a header, then ``path, class name, probability`` per image."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for f, c, p in zip(files, classes.tolist(), probabilities.tolist()):
        writer.writerow([str(f), names[c], f"{p:.6f}"])
    return buffer.getvalue()


def predict_checkpoint(ckpt: str | Path, images: str | Path, out: str | Path, batch_size: int = 64) -> Path:
    """Predict every image of ``images`` with the model of ``ckpt`` (a checkpoint file or an export folder); write
    ``out`` (CSV, atomically).

    Raises:
        FileNotFoundError: no checkpoint, an export folder without a manifest, or no images.
        ValueError: not a dgkit checkpoint, a foreign export manifest, or a method with no trained head (SimCLR).
        RuntimeError: an unreadable image (named).
    """
    files = find_images(images)
    model, task, data_config, names = load_predictor(ckpt)
    classes, probabilities = predict_files(model, task, data_config, files, batch_size)
    return atomic_write_text(out, predictions_csv(files, classes, probabilities, names))


def load_predictor(ckpt: str | Path) -> tuple[Callable[[torch.Tensor], torch.Tensor], Task, DataConfig, list[str]]:
    """``(model, task, preprocessing, class names)`` of a checkpoint file (``to_inference()``) or of an export
    folder (a directory holding ``manifest.json``: the exported model)."""
    if Path(ckpt).is_dir():
        exported = load_export(ckpt)
        return exported, exported.task, exported.data_config, exported.classes
    _, method = load_checkpoint(ckpt)
    stored = data_config_from_meta(method.meta["data_config"])
    return method.to_inference(), method.task, stored, list(method.meta["classes"])
