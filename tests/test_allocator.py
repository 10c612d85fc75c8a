"""dgkit.utils.allocator: glibc keeps freed large blocks after :func:`tune_allocator` (issue 19, item 0).

The effect is read back from the kernel, not from dgkit: minor page faults of a loop that mallocs, touches and
frees 40 MiB (above glibc's largest mmap threshold, 32 MiB, so by default each round is a fresh ``mmap``: one
fault per 4 KiB page) drop to about zero once the settings are applied. Each check runs in a subprocess, since
the settings are process-wide.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import runpy
import subprocess
import sys

import pytest

from dgkit.utils import allocator
from tests.conftest import ROOT

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings exist on glibc only")

_PROBE = """
import ctypes, json, resource, sys
from dgkit.utils.allocator import tune_allocator
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, (ctypes.c_size_t,), (ctypes.c_void_p,)
N = 40 << 20
def faults(rounds=5):
    out = []
    for _ in range(rounds):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(N); ctypes.memset(p, 1, N); libc.free(p)
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return out
before = faults()
tuned = tune_allocator(sys.argv[1] if len(sys.argv) > 1 else None)
print(json.dumps({"before": before, "tuned": tuned, "after": faults()}))
"""


def _probe(*args: str, env: dict[str, str] | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != allocator.ENV} | (env or {})
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


PAGES = (40 << 20) // os.sysconf("SC_PAGE_SIZE")


@glibc
def test_tuned_allocator_reuses_large_blocks() -> None:
    """Before: every round faults in all 10,240 pages (a fresh mmap); after: only the first round, which grows
    the heap, faults; later rounds reuse it."""
    r = _probe()
    assert r["tuned"] is True
    assert min(r["before"]) >= 0.9 * PAGES  # glibc's default: mmap + munmap each round
    assert max(r["after"][1:]) < 0.01 * PAGES  # reused: no page faulted in again


@glibc
def test_default_choice_leaves_glibc_alone() -> None:
    """``DGKIT_MALLOC=default`` (or the argument) keeps glibc's behaviour: every round still faults."""
    for r in (_probe(env={allocator.ENV: "default"}), _probe("default")):
        assert r["tuned"] is False
        assert min(r["after"]) >= 0.9 * PAGES


def test_bad_choice_names_the_variable_and_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(allocator.ENV, "off-please")
    with pytest.raises(ValueError, match=r"DGKIT_MALLOC='off-please'.*\['tuned', 'default'\]"):
        allocator.tune_allocator()


def test_other_c_libraries_are_a_logged_no_op(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """Without glibc (musl, macOS, Windows) nothing is called and a debug line says so."""
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    monkeypatch.setattr(allocator, "_applied", False)
    with caplog.at_level(logging.DEBUG, logger=allocator.__name__):
        assert allocator.tune_allocator("tuned") is False
    assert "not glibc" in caplog.text


@pytest.mark.parametrize("script", ["train.py", "scripts/evaluate.py", "scripts/predict.py"])
def test_entry_points_set_the_allocator_up(script: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each entry point calls :func:`tune_allocator` when run as a program, before any work: a bad
    ``DGKIT_MALLOC`` stops it with the allocator's own message (and leaves this process's malloc untouched)."""
    monkeypatch.setenv(allocator.ENV, "bogus")
    monkeypatch.setattr(sys, "argv", [script, "--help"])  # without the call: help, exit 0, nothing trained
    with pytest.raises(ValueError, match="DGKIT_MALLOC='bogus' is not a valid allocator setting"):
        runpy.run_path(str(ROOT / script), run_name="__main__")
