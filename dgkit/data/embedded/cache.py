"""Generate-once cache for embedded benchmarks: ``<root>/<name>/{<domain>.npz, manifest.json}``.

Embedded benchmarks are built offline from data that ships inside installed packages, so instead of a
download step they have a generate step, run on first use and cached. The manifest records what was
asked for (``version`` and ``params``) and a checksum per domain, so a stale or damaged cache is
detected and rebuilt instead of silently feeding wrong data to a run.

Every file is written atomically (temporary file + rename, :mod:`dgkit.utils.io`) and the manifest is
written last: two processes generating the same benchmark at once write identical files, and a reader
never sees a half-written one. A crash mid-generation leaves no manifest (or the old one, whose
checksums then fail), so the next load regenerates.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from dgkit.utils.io import atomic_write, atomic_write_json

log = logging.getLogger(__name__)

Arrays = dict[str, tuple[np.ndarray, np.ndarray]]
MANIFEST = "manifest.json"


def array_checksum(images: np.ndarray, labels: np.ndarray) -> str:
    """SHA-256 (hex) of a domain's images and labels: dtype, shape and raw bytes of each."""
    h = hashlib.sha256()
    for a in (images, labels):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _normalise(params: dict) -> Any:
    """``params`` as JSON would round-trip them (tuples become lists), for comparison with a manifest."""
    return json.loads(json.dumps(params, sort_keys=True, default=str))


def _check(name: str, images: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"domain {name!r}: images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if labels.ndim == 3:  # dense labels (segmentation masks (N, H, W)) stay uint8: int64 would be 8x the size
        if labels.shape != images.shape[:3] or labels.dtype != np.uint8:
            raise ValueError(
                f"domain {name!r}: masks must be uint8 {images.shape[:3]}, got {labels.dtype} {labels.shape}"
            )
        return np.ascontiguousarray(images), np.ascontiguousarray(labels)
    if labels.shape != (len(images),):
        raise ValueError(f"domain {name!r}: {len(images)} images but labels of shape {labels.shape}")
    return np.ascontiguousarray(images), labels.astype(np.int64)


def _read(folder: Path, version: str, params: dict) -> tuple[Arrays | None, str]:
    """The cached arrays, or ``None`` and the reason they cannot be used."""
    path = folder / MANIFEST
    if not path.exists():
        return None, "no cache yet"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        domains, checksums = manifest["domains"], manifest["checksums"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"unreadable manifest ({e})"
    if manifest.get("version") != version:
        return None, f"version changed ({manifest.get('version')} -> {version})"
    if manifest.get("params") != _normalise(params):
        return None, f"params changed ({manifest.get('params')} -> {_normalise(params)})"
    arrays: Arrays = {}
    for d in domains:
        file = folder / f"{d}.npz"
        if not file.exists():
            return None, f"missing {file.name}"
        try:
            with np.load(file, allow_pickle=False) as z:
                images, labels = z["images"], z["labels"]
        except Exception as e:  # a truncated or overwritten npz raises anything from BadZipFile to ValueError
            return None, f"unreadable {file.name} ({type(e).__name__})"
        if array_checksum(images, labels) != checksums.get(d):
            return None, f"checksum mismatch in {file.name}"
        arrays[d] = (images, labels)
    return arrays, ""


def _write(folder: Path, name: str, version: str, params: dict, arrays: Arrays) -> None:
    for d, (images, labels) in arrays.items():
        atomic_write(folder / f"{d}.npz", lambda f, x=images, y=labels: np.savez(f, images=x, labels=y), binary=True)
    manifest = {
        "name": name,
        "version": version,
        "params": _normalise(params),
        "domains": list(arrays),
        "counts": {d: int(len(y)) for d, (_, y) in arrays.items()},
        "checksums": {d: array_checksum(x, y) for d, (x, y) in arrays.items()},
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    atomic_write_json(folder / MANIFEST, manifest)


def load_or_generate(
    name: str,
    root: str | Path,
    generate: Callable[[], Arrays],
    version: str,
    params: dict,
) -> Arrays:
    """Load ``root/name`` if its manifest matches ``version`` and ``params`` and every checksum holds, else
    call ``generate()`` and cache its output.

    Returns ``{domain: (images uint8 (N, H, W, 3), labels int64 (N,))}`` in the generator's domain order.
    """
    folder = Path(root) / name
    arrays, reason = _read(folder, version, params)
    if arrays is not None:
        return arrays
    damaged = reason.startswith(("missing", "unreadable", "checksum"))
    log.log(logging.WARNING if damaged else logging.INFO, "%s: generating into %s (%s)", name, folder, reason)
    arrays = {d: _check(d, x, y) for d, (x, y) in generate().items()}
    _write(folder, name, version, params, arrays)
    return arrays


def read_manifest(name: str, root: str | Path) -> dict | None:
    """The manifest of ``root/name`` as a dict, or ``None`` when there is none."""
    path = Path(root) / name / MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
