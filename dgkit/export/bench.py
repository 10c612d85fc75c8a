"""Latency of a model callable at a declared thread count: the numbers ``bench.json`` and
``scripts/bench_export.py`` report.

Each measurement is the median of ``runs`` calls after ``warmup`` calls, as wall-clock milliseconds and as process
CPU milliseconds: on a shared machine the CPU time of a one-thread run tracks the uncontended latency better than
the wall clock.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

BATCHES = (1, 32)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run PyTorch with ``threads`` intra-op threads inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def median_ms(fn: Callable[[torch.Tensor], object], x: torch.Tensor, runs: int = 20, warmup: int = 3) -> dict:
    """``{"wall_ms", "cpu_ms"}``: medians over ``runs`` calls of ``fn(x)`` after ``warmup`` calls.

    Raises:
        ValueError: ``runs < 1`` or ``warmup < 0``.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs={runs} must be >= 1 and warmup={warmup} >= 0")
    for _ in range(warmup):
        fn(x)
    wall, cpu = [], []
    for _ in range(runs):
        w, c = time.perf_counter(), time.process_time()
        fn(x)
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return {"wall_ms": 1e3 * statistics.median(wall), "cpu_ms": 1e3 * statistics.median(cpu)}


def interleaved_ms(fns: dict[str, Callable[[torch.Tensor], object]], x: torch.Tensor, runs: int = 20,
                   warmup: int = 3) -> dict[str, dict]:  # fmt: skip
    """:func:`median_ms` of several callables measured round-robin (A B C A B C ...), so that machine load hits
    them alike; each call is timed alone."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs={runs} must be >= 1 and warmup={warmup} >= 0")
    for fn in fns.values():
        for _ in range(warmup):
            fn(x)
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            w, c = time.perf_counter(), time.process_time()
            fn(x)
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - w)
    return {n: {"wall_ms": 1e3 * statistics.median(wall[n]), "cpu_ms": 1e3 * statistics.median(cpu[n])} for n in fns}


def example_batch(shape: Sequence[int], batch: int, seed: int = 0) -> torch.Tensor:
    """A seeded normal batch ``(batch, *shape)`` (latency does not depend on the pixel values)."""
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


def latency(fn: Callable[[torch.Tensor], object], shape: Sequence[int], batches: Sequence[int] = BATCHES,
            runs: int = 20, warmup: int = 3) -> dict[str, dict]:  # fmt: skip
    """``{"batch_<n>": median_ms(...)}`` of ``fn`` on seeded inputs of image ``shape (C, H, W)``."""
    with torch.no_grad():
        return {f"batch_{b}": median_ms(fn, example_batch(shape, b), runs, warmup) for b in batches}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
