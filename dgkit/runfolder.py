"""The run folder's lifecycle: resume, skip or start over, and the outcome files, all written atomically.

A run folder holds ``config.yaml`` (the resolved config), ``run.json`` (what result collection groups by),
``results.jsonl`` (every evaluation), ``checkpoints/{best,last}.ckpt``, ``final.json`` (the selected step) and
``done`` (written last). Rerunning a command resumes from ``last.ckpt``; a finished run (``done``) is skipped;
a folder holding another configuration or seed is refused, never mixed with this run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from dgkit.utils.io import atomic_write_json, atomic_write_text

RESUME_MODES = ("auto", "true", "false")


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

    def prepare(self, identity: dict[str, Any]) -> None:
        """Before training: with ``resume=false`` clear the previous attempt; otherwise refuse a folder whose
        ``run.json`` holds another identity (``{"hparams", "seed"}``)."""
        if self.mode == "false":
            self._clear()
        else:
            self._check_same_run(identity)

    def resume_checkpoint(self) -> str | None:
        """The checkpoint to resume from (``last.ckpt``), or ``None`` to start from scratch.

        Raises:
            FileNotFoundError: ``resume=true`` without a ``last.ckpt``.
        """
        last = self.checkpoints / "last.ckpt"
        if self.mode == "true" and not last.exists():
            raise FileNotFoundError(f"resume=true but there is no checkpoint at {last}")
        return str(last) if self.mode != "false" and last.exists() else None

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
        changed = [k for k in identity if old.get(k) != identity[k]]
        if changed:
            raise ValueError(
                f"{self.path} holds a run with other {' and '.join(changed)} "
                f"({', '.join(f'{k} {old.get(k)}' for k in changed)}): the config changed since it was trained. "
                "Pass resume=false to train it again from scratch, or choose another output folder "
                "(hydra.run.dir=... / hydra.sweep.dir=...)."
            )

    def _clear(self) -> None:
        """Forget the previous attempt (records, checkpoints, outcome) before starting over."""
        for name in ("results.jsonl", "final.json", "done"):
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.checkpoints, ignore_errors=True)
