"""``manifest.json``: what an export folder holds and everything needed to use it without dgkit's training code.

An export folder (``scripts/export.py``) is self-describing: the manifest names its format and version, the
versions of dgkit and the libraries that wrote it (and the git commit when there is one), the model file and its
input/output, the preprocessing (input size, mean, std, interpolation), the task config and class names, the
dataset's domains and held-out domains, the transform chain (each link's config and a JSON summary of its state,
tensors replaced by their shape and dtype), the calibration each link read (domains and image counts), and the
other files with their sizes and SHA-256. :func:`read_manifest` refuses a folder whose manifest is missing, foreign
or incomplete, naming what is wrong.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import subprocess
from pathlib import Path
from typing import Any

from dgkit.backbones.base import DataConfig
from dgkit.utils.io import atomic_write_json, jsonable

FORMAT = "dgkit-export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED = ("format", "format_version", "kind", "model", "preprocessing", "task", "classes", "domains",
            "test_domains", "chain", "files")  # fmt: skip
PREPROCESSING_KEYS = ("input_size", "mean", "std", "interpolation")
LIBRARIES = ("dgkit", "torch", "onnx", "onnxruntime", "onnxscript", "timm")


def versions() -> dict[str, str | None]:
    """Installed versions of dgkit and the libraries an export depends on (``None``: not installed)."""
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_hash() -> str | None:
    """The commit of the dgkit source tree (``+dirty`` with uncommitted changes), or ``None`` outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def chain_summary(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The transform chain's records (config, stage, state) as JSON, tensors summarised."""
    return [{"config": jsonable(r.get("config")), "stage": r.get("stage"), "state": jsonable(r.get("state") or {})}
            for r in records]  # fmt: skip


def calibration_summary(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per link that calibrated: its target, the domains and image counts it read, ``allow_target``."""
    out = []
    for r in records:
        calibration = r.get("calibration") or (r.get("state") or {}).get("calibration")
        if calibration:
            target = (r.get("config") or {}).get("_target_")
            out.append({"link": target, **jsonable(calibration)})
    return out


def file_record(path: Path) -> dict[str, Any]:
    """``{"bytes", "sha256"}`` of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def build_manifest(meta: dict[str, Any], kind: str, model: dict[str, Any], folder: Path,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """The manifest of an export folder.

    Args:
        meta: the checkpoint's metadata (``method.meta``: task, classes, domains, data_config, chain).
        kind: the export kind (``onnx``, ``torch``).
        model: the model entry (``file``, ``runtime``, ``input``, ``output``, ...).
        folder: the folder whose files (every file but the manifest) are listed with sizes and hashes.
        extra: more top-level entries (the source checkpoint, parity thresholds).
    """
    stored = meta["data_config"]
    chain = list(meta.get("chain") or [])
    files = {p.name: file_record(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "versions": versions(),
        "git": git_hash(),
        "model": model,
        "preprocessing": {
            k: jsonable(stored.get(k, "bilinear" if k == "interpolation" else None))
            for k in (*PREPROCESSING_KEYS, "extra")
        },  # fmt: skip
        "task": jsonable(meta["task"]),
        "dataset": meta.get("dataset"),
        "classes": list(meta["classes"]),
        "domains": list(meta["domains"]),
        "test_domains": list(meta["test_domains"]),
        "chain": chain_summary(chain),
        "calibration": calibration_summary(chain),
        "files": files,
        **(extra or {}),
    }


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` into ``folder`` (atomically)."""
    return atomic_write_json(Path(folder) / MANIFEST, manifest)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The validated manifest of an export folder.

    Raises:
        FileNotFoundError: no folder, no ``manifest.json`` in it, or a file it lists is missing.
        ValueError: the manifest is not JSON, not dgkit's (another format), of a newer version, or lacks keys.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such export folder (write one with scripts/export.py ckpt=PATH)")
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} has no {MANIFEST}: not a dgkit export folder (write one with scripts/export.py ckpt=PATH, "
            "or give a checkpoint file)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): not a dgkit export manifest") from err
    validate_manifest(manifest, folder)
    return manifest


def validate_manifest(manifest: Any, folder: Path) -> None:
    """Check a parsed manifest (see :func:`read_manifest`); raise naming what is foreign, missing or newer."""
    path = folder / MANIFEST
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{path}: format {found!r}, expected {FORMAT!r}: not a dgkit export manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r}; this dgkit reads versions up to {FORMAT_VERSION}")
    missing = [k for k in REQUIRED if k not in manifest]
    missing += [f"preprocessing.{k}" for k in PREPROCESSING_KEYS if k not in (manifest.get("preprocessing") or {})]
    missing += [f"model.{k}" for k in ("file", "runtime") if k not in (manifest.get("model") or {})]
    if missing:
        raise ValueError(f"{path} lacks {missing}: an incomplete dgkit export manifest")
    absent = [name for name in [manifest["model"]["file"], *manifest["files"]] if not (folder / name).is_file()]
    if absent:
        raise FileNotFoundError(f"{folder}: files named by its {MANIFEST} are missing: {sorted(set(absent))}")


def data_config(manifest: dict[str, Any]) -> DataConfig:
    """The preprocessing the manifest records, as the :class:`DataConfig` the evaluation pipeline builds from."""
    stored = manifest["preprocessing"]
    return DataConfig(
        input_size=tuple(stored["input_size"]),
        mean=tuple(stored["mean"]),
        std=tuple(stored["std"]),
        interpolation=stored.get("interpolation") or "bilinear",
        extra=dict(stored.get("extra") or {}),
    )
