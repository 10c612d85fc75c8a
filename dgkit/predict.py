"""Predict with a trained model on image files: the checkpoint's own preprocessing, no dataset needed.

:func:`predict_checkpoint` rebuilds the model from a checkpoint (:func:`dgkit.checkpoint.load_checkpoint`),
takes :meth:`~dgkit.methods.base.Method.to_inference` (adapters merged, training-only parts dropped), applies the
evaluation pipeline built from the stored ``data_config`` (resize + normalise, as validation did) and writes
``predictions.csv`` with one row per image, the task's prediction record
(:meth:`~dgkit.tasks.Task.prediction_records`): ``path, class, probability`` for classification; for segmentation
``path, mask_path``, with one mask PNG per image (class ids as ``uint8``, at the image's original size) written in
a folder beside the CSV (``predictions_masks/``). Given an export folder instead
(``scripts/export.py``: a directory with ``manifest.json``), it runs the exported model
(:func:`dgkit.export.runtime.load_export`) with the manifest's preprocessing, classes and task; the CSV is the same.
``scripts/predict.py`` is its command.
"""

from __future__ import annotations

import csv
import glob
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from dgkit.backbones.base import DataConfig
from dgkit.checkpoint import load_checkpoint
from dgkit.data.folder import IMAGE_EXTENSIONS, read_image
from dgkit.data.transforms import build_transform
from dgkit.export.runtime import load_export
from dgkit.tasks import Task
from dgkit.utils.io import atomic_write_text

CSV_COLUMNS = ("path", "class", "probability")
"""The CSV columns of a classification model (a segmentation model's: ``path, mask_path``)."""


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
    classes: Sequence[str],
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """The prediction record of ``model`` on every image file (:meth:`~dgkit.tasks.Task.prediction_records`: the
    class and its probability, or a segmentation mask at the image's original size).

    Args:
        model: an inference module (normalised images to the task's outputs), in eval mode, or an exported model.
        task: the task that turns outputs into records.
        data_config: the preprocessing (the checkpoint's).
        files: image paths; an unreadable one raises naming the file.
        classes: the class names.
        batch_size: images per forward pass.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    transform = build_transform(data_config, "none", train=False)
    records: list[dict[str, Any]] = []
    for start in range(0, len(files), batch_size):
        images = [read_image(f) for f in files[start : start + batch_size]]
        x = torch.stack([transform(image=image)["image"] for image in images])
        sizes = [tuple(int(v) for v in image.shape[:2]) for image in images]  # original (H, W)
        records.extend(task.prediction_records(model(x), sizes, classes))
    return records


def artifact_paths(files: Sequence[Path], folder: Path) -> list[Path]:
    """Where each image's per-image output file goes: its path relative to the images' common folder, under
    ``folder``, as ``.png`` (sub-folders kept, so equal names in different folders do not collide)."""
    resolved = [Path(f).resolve() for f in files]
    common = Path(os.path.commonpath([str(f.parent) for f in resolved]))
    return [folder / f.relative_to(common).with_suffix(".png") for f in resolved]


def predictions_csv(
    files: Sequence[Path], records: Sequence[dict[str, Any]], out: Path, out_dir: str | Path | None = None
) -> str:
    """The CSV text: a header, then ``path`` and the record's columns per image (floats with 6 decimals).

    A record's array value (``mask``) is written as a PNG under ``out_dir`` (default: ``<csv stem>_<column>s``
    beside the CSV, e.g. ``predictions_masks/``) and its column becomes ``<column>_path``.
    """
    if not records:
        raise ValueError("no predictions to write")
    arrays = [k for k, v in records[0].items() if isinstance(v, np.ndarray)]
    folders = {k: Path(out_dir) if out_dir is not None else out.parent / f"{out.stem}_{k}s" for k in arrays}
    targets = {k: artifact_paths(files, folders[k]) for k in arrays}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", *(f"{k}_path" if k in arrays else k for k in records[0])])
    for i, (f, record) in enumerate(zip(files, records)):
        row = [str(f)]
        for k, v in record.items():
            if k in arrays:
                targets[k][i].parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(v).save(targets[k][i])
                row.append(str(targets[k][i]))
            else:
                row.append(f"{v:.6f}" if isinstance(v, float) else v)
        writer.writerow(row)
    return buffer.getvalue()


def predict_checkpoint(
    ckpt: str | Path, images: str | Path, out: str | Path, batch_size: int = 64, out_dir: str | Path | None = None
) -> Path:
    """Predict every image of ``images`` with the model of ``ckpt`` (a checkpoint file or an export folder); write
    ``out`` (CSV, atomically) and, for a segmentation model, one mask PNG per image under ``out_dir`` (default:
    ``<csv stem>_masks/`` beside the CSV).

    Raises:
        FileNotFoundError: no checkpoint, an export folder without a manifest, or no images.
        ValueError: not a dgkit checkpoint, a foreign export manifest, or a method with no trained head (SimCLR).
        RuntimeError: an unreadable image (named).
    """
    files = find_images(images)
    model, task, data_config, names = load_predictor(ckpt)
    records = predict_files(model, task, data_config, files, names, batch_size)
    return atomic_write_text(out, predictions_csv(files, records, Path(out), out_dir))


def load_predictor(ckpt: str | Path) -> tuple[Callable[[torch.Tensor], torch.Tensor], Task, DataConfig, list[str]]:
    """``(model, task, preprocessing, class names)`` of a checkpoint file (``to_inference()``) or of an export
    folder (a directory holding ``manifest.json``: the exported model)."""
    if Path(ckpt).is_dir():
        exported = load_export(ckpt)
        return exported, exported.task, exported.data_config, exported.classes
    _, method = load_checkpoint(ckpt)
    stored = data_config_from_meta(method.meta["data_config"])
    return method.to_inference(), method.task, stored, list(method.meta["classes"])
