"""The run folder's lifecycle: resume, skip or start over, and the outcome files, all written atomically.

A run folder holds ``config.yaml`` (the resolved config), ``run.json`` (what result collection groups by, and
the run's identity), ``results.jsonl`` (every evaluation), ``checkpoints/{best,last}.ckpt``, ``final.json`` (the
selected step) and ``done`` (written last). Rerunning a command resumes from ``last.ckpt``; a finished run
(``done``) is skipped.

- **Identity.** Everything that changes the result: the config's id without the step budget, the seed, the
  held-out domains, the data's fingerprint, the training-augmentation path (``batch`` tensors or ``per_image``
  albumentations: they draw different augmentations), the decoded cache read (``data_cache``: pre-resized pixels)
  and the device count (:data:`IDENTITY_KEYS`). A folder holding a run of another identity is never resumed or
  skipped into: the run stops, naming what differs and how to go on. The step budget is checked apart
  (:func:`dgkit.run.train`): a run can be extended to more steps when nothing in it depends on the budget.
- **Claim.** A folder is claimed only once training produced something (records or checkpoints): a start that
  failed before that (a bad learning rate) leaves nothing that blocks the corrected command.
- **Lock.** :meth:`RunFolder.lock` holds an OS file lock (``.lock``, with the holder's PID and host) for the
  whole run; a second launch into the folder stops at once. A lock left by a dead process is free again (the
  OS releases it), so it is taken over.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dgkit.errors import UserError
from dgkit.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

RESUME_MODES = ("auto", "true", "false")
IDENTITY_KEYS = ("config", "seed", "test_domains", "data_fingerprint", "augment_path", "data_cache", "devices")
"""The ``run.json`` keys that must match for a folder to be resumed or skipped into."""
LEGACY_IDENTITY = {"augment_path": "per_image", "data_cache": "none"}
"""What a ``run.json`` written before a key existed had: every run augmented per image before batch augmentation,
and decoded its files before the decoded cache."""
_CLAIMING = ("results.jsonl", "final.json", "done", "checkpoints/last.ckpt", "checkpoints/best.ckpt")


class RunFolderInUse(UserError):
    """Another process holds the run folder's lock."""


class RunFolder:
    """One run's folder.

    Args:
        path: the folder (``output_dir``).
        resume: ``auto`` (continue from ``last.ckpt`` when present), ``true`` (require it) or ``false`` (forget
            any previous attempt and start over).
    """

    def __init__(self, path: str | Path, resume: str | bool = "auto") -> None:
        mode = str(resume).lower()
        if mode not in RESUME_MODES:
            raise ValueError(f"resume={resume!r}; choose one of {', '.join(RESUME_MODES)}")
        self.path = Path(path)
        self.mode = mode

    @property
    def results(self) -> Path:
        """``results.jsonl``: one record per evaluation."""
        return self.path / "results.jsonl"

    @property
    def checkpoints(self) -> Path:
        """The checkpoint folder."""
        return self.path / "checkpoints"

    @property
    def best_checkpoint(self) -> Path:
        """``checkpoints/best.ckpt``: the step chosen by training-domain validation."""
        return self.checkpoints / "best.ckpt"

    @property
    def finished(self) -> bool:
        """Whether the run finished (its ``done`` marker exists)."""
        return (self.path / "done").exists()

    @property
    def claimed(self) -> bool:
        """Whether a previous attempt trained here (records, checkpoints or an outcome exist)."""
        return any((self.path / name).exists() for name in _CLAIMING)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder's OS lock for the ``with`` block.

        Raises:
            RunFolderInUse: another live process holds it (its PID and host are named).
        """
        self.path.mkdir(parents=True, exist_ok=True)
        file = self.path / ".lock"
        handle = open(file, "a+")  # noqa: SIM115 (held open for the whole block)
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "an unknown process"
                raise RunFolderInUse(
                    f"{self.path} is in use by {holder}: another launch of this run is training there. Wait for it "
                    "to finish, or choose another output folder (hydra.run.dir=... / hydra.sweep.dir=...)."
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"PID {os.getpid()} on host {socket.gethostname()}\n")
            handle.flush()
            yield
        finally:
            handle.close()  # releases the lock

    def prepare(self, identity: dict[str, Any]) -> None:
        """Before training: with ``resume=false`` clear the previous attempt; otherwise refuse a claimed folder
        whose ``run.json`` holds another identity (the :data:`IDENTITY_KEYS` of ``identity``)."""
        if self.mode == "false":
            self._clear()
        elif self.claimed:
            self._check_same_run(identity)

    def previous(self) -> dict[str, Any]:
        """The ``run.json`` of the folder's previous attempt (``{}`` when there is none)."""
        file = self.path / "run.json"
        return json.loads(file.read_text()) if file.exists() else {}

    def reopen(self) -> None:
        """Turn a finished run back into an interrupted one (to extend it): remove ``done`` and ``final.json``."""
        for name in ("done", "final.json"):
            (self.path / name).unlink(missing_ok=True)

    def resume_checkpoint(self, readable: Callable[[Path], str | None]) -> str | None:
        """The checkpoint to resume from (``last.ckpt``), or ``None`` to start from scratch.

        A ``last.ckpt`` that cannot be read falls back to ``best.ckpt`` (an earlier step: the records after it are
        dropped and retrained) with a warning.

        Args:
            readable: returns why a checkpoint file cannot be read, or ``None`` when it can.

        Raises:
            FileNotFoundError: ``resume=true`` without a ``last.ckpt``.
            ValueError: ``last.ckpt`` is unreadable and no readable ``best.ckpt`` exists (path and fix named).
        """
        last = self.checkpoints / "last.ckpt"
        if self.mode == "true" and not last.exists():
            raise FileNotFoundError(f"resume=true but there is no checkpoint at {last}")
        if self.mode == "false" or not last.exists():
            return None
        problem = readable(last)
        if problem is None:
            return str(last)
        if self.best_checkpoint.exists() and readable(self.best_checkpoint) is None:
            log.warning("%s cannot be read (%s); resuming from %s instead", last, problem, self.best_checkpoint)
            return str(self.best_checkpoint)
        raise ValueError(
            f"cannot resume: {last} cannot be read ({problem}) and there is no readable best.ckpt. "
            "Pass resume=false to train this run again from scratch."
        )

    def write_start(self, config_yaml: str, run_info: dict[str, Any]) -> None:
        """Write ``config.yaml`` and ``run.json`` (atomically) when training starts."""
        atomic_write_text(self.path / "config.yaml", config_yaml)
        atomic_write_json(self.path / "run.json", run_info)

    def read_final(self) -> dict[str, Any]:
        """The finished run's ``final.json``."""
        return json.loads((self.path / "final.json").read_text())

    def write_final(self, final: dict[str, Any]) -> None:
        """Write ``final.json`` atomically."""
        atomic_write_json(self.path / "final.json", final)

    def mark_done(self) -> None:
        """Write the ``done`` marker: the last file of a finished run."""
        atomic_write_text(self.path / "done", "")

    def _check_same_run(self, identity: dict[str, Any]) -> None:
        previous = self.path / "run.json"
        if not previous.exists():
            return
        old = json.loads(previous.read_text())
        keys = list(IDENTITY_KEYS)
        if "config" not in old:  # written before the identity was recorded: compare the hyper-parameter id
            keys[0] = "hparams"
        old = {**LEGACY_IDENTITY, **old}
        # other keys an older run.json lacks cannot be compared (folders written before they were recorded)
        changed = [k for k in keys if k in identity and old.get(k) is not None and old[k] != identity[k]]
        if changed:
            details = "; ".join(f"{k}: {old[k]} there, {identity[k]} now" for k in changed)
            raise ValueError(
                f"{self.path} holds another run ({details}). It is neither resumed nor reported as this one. "
                "Choose another output folder (hydra.run.dir=... / hydra.sweep.dir=...), or pass resume=false to "
                "delete that run and train this one there."
            )

    def _clear(self) -> None:
        """Forget the previous attempt (records, checkpoints, outcome) before starting over."""
        for name in ("results.jsonl", "final.json", "done"):
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.checkpoints, ignore_errors=True)
