"""glibc ``malloc`` set-up for training processes: keep freed large buffers instead of handing them to the kernel.

Why: PyTorch's CPU tensors come from ``malloc``. glibc serves every request above its mmap threshold (at most
32 MiB on 64-bit, its dynamic ceiling) with a fresh ``mmap`` and unmaps it on ``free``. The first convolution's
output of DomainBed's MNIST CNN at 3 × 64 images of 28 px is 38.5 MiB, so every step maps, page-faults in (one
minor fault per 4 KiB page) and unmaps each such activation and its gradient again: tens of thousands of faults
and a fifth of a CPU step in kernel time (dgkit issue 19). Smaller freed blocks at the top of the heap are
likewise given back (``brk`` trimming) and faulted in again on the next step.

:func:`tune_allocator` calls ``mallopt(M_MMAP_MAX, 0)`` (large blocks come from the heap, reused across steps) and
``mallopt(M_TRIM_THRESHOLD, -1)`` (the heap is never trimmed), the documented equivalents of
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<huge>``. The cost: memory freed by the process is kept for reuse and
returned to the system only at exit, so the resident size stays at its peak. Training entry points
(``train.py``, ``scripts/evaluate.py``, ``scripts/predict.py``) call it; set ``DGKIT_MALLOC=default`` to leave
glibc's defaults alone. On other C libraries (musl, macOS, Windows) it does nothing and logs that at debug level.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

ENV = "DGKIT_MALLOC"
"""Environment variable: ``tuned`` (default) or ``default`` (leave glibc's allocator as it is)."""
CHOICES = ("tuned", "default")

# mallopt parameter numbers from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_applied = False


def allocator_choice(value: str | None = None) -> str:
    """The allocator setting asked for: ``value``, else ``$DGKIT_MALLOC``, else ``tuned``.

    Raises:
        ValueError: a value other than ``tuned`` or ``default`` (naming the variable and the choices).
    """
    choice = (value if value is not None else os.environ.get(ENV, "tuned")).strip().lower() or "tuned"
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={choice!r} is not a valid allocator setting; choose one of {list(CHOICES)}")
    return choice


def _glibc() -> ctypes.CDLL | None:
    """The running glibc, or ``None`` on any other C library."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()  # only glibc has it
        return libc
    except (OSError, AttributeError):
        return None


def tune_allocator(choice: str | None = None) -> bool:
    """Keep freed large buffers in the process (no per-step ``mmap``/``munmap`` or heap trimming) on glibc.

    Args:
        choice: ``tuned`` or ``default``; ``None`` reads ``$DGKIT_MALLOC`` (unset: ``tuned``).

    Returns:
        Whether glibc's settings are now tuned (``False`` with ``default`` or on another C library).
    """
    global _applied
    if allocator_choice(choice) == "default":
        log.debug("%s=default: glibc's malloc settings left alone", ENV)
        return _applied
    if _applied:
        return True
    libc = _glibc()
    if libc is None:
        log.debug("not glibc: malloc settings left alone (%s has no effect here)", ENV)
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, -1) == 1
    if not ok:
        log.debug("glibc's mallopt refused the settings; malloc left as it is")
        return False
    _applied = True
    log.debug("glibc malloc: no mmap for large blocks, no heap trimming (%s=default to turn off)", ENV)
    return True


__all__ = ["CHOICES", "ENV", "allocator_choice", "tune_allocator"]
