"""Atomic file writes: a crash never leaves a half-written result, manifest or checkpoint.

Everything is written to a temporary file in the same folder, flushed, then moved over the
target with ``os.replace`` (atomic on POSIX and Windows when source and target share a volume).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch


@cache
def _file_mode() -> int:
    """The mode a plain ``open()`` would give a new file (0o666 less the umask); mkstemp's 0o600 is too strict."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], binary: bool = False) -> Path:
    """Call ``write(fileobj)`` on a temporary file beside ``path``, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file; a missing file is an empty list."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def atomic_write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    """Rewrite a JSON-lines file atomically with ``records``."""
    return atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def jsonable(value: Any, max_items: int = 0) -> Any:
    """``value`` as plain JSON: tensors and arrays with at most ``max_items`` elements become lists, larger ones
    ``{"tensor": {"shape", "dtype"}}``, 0-d ones numbers; tuples become lists, other objects their ``str``."""
    if isinstance(value, torch.Tensor | np.ndarray | np.generic):
        if value.ndim == 0 or 0 < int(np.prod(value.shape)) <= max_items:
            return value.tolist()
        return {"tensor": {"shape": list(value.shape), "dtype": str(value.dtype)}}
    if isinstance(value, dict):
        return {str(k): jsonable(v, max_items) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v, max_items) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
