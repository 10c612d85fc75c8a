"""OmegaConf resolvers used by ``conf/`` (registered before Hydra composes the config)."""

from __future__ import annotations

import hashlib
import os
import re

from omegaconf import OmegaConf

_UNSAFE = re.compile(r"[^A-Za-z0-9=,._+\-\[\]]+")


def slug(text: str, max_len: int = 160) -> str:
    """A folder name from Hydra's ``override_dirname``: deterministic, so a relaunch finds its run again."""
    if not text:
        return "default"
    safe = _UNSAFE.sub("_", text).strip("_") or "default"
    # Substituted characters could make two different override sets collide, and long names are cut: a hash
    # of the original text keeps them apart.
    if safe != text or len(safe) > max_len:
        safe = safe[: max_len - 9] + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return safe


def default_workers(cpus: int | None = None) -> int:
    """DataLoader processes per loader for this machine: a quarter of the cores, at most 4 (0 on 2 cores, where
    worker processes only compete with the model for the CPU)."""
    cpus = cpus or os.cpu_count() or 1
    return min(4, cpus // 4)


def basename(path: str) -> str:
    """The last part of a path (``/data/my_styles/`` -> ``my_styles``): a folder dataset's name."""
    return os.path.basename(os.path.normpath(str(path))) or str(path)


def register_resolvers() -> None:
    """Register ``${dgkit.slug:...}``, ``${dgkit.workers:}`` and ``${dgkit.basename:...}`` (idempotent)."""
    if not OmegaConf.has_resolver("dgkit.slug"):
        OmegaConf.register_new_resolver("dgkit.slug", slug)
    if not OmegaConf.has_resolver("dgkit.workers"):
        OmegaConf.register_new_resolver("dgkit.workers", default_workers)
    if not OmegaConf.has_resolver("dgkit.basename"):
        OmegaConf.register_new_resolver("dgkit.basename", basename)
