"""Warn when one result row mixes algorithms.

Runs with equal ``dataset`` and ``tag`` form one table row, and their ``hparams`` ids are taken as candidates of
one algorithm that model selection chooses between (DomainBed's protocol, see :mod:`dgkit.eval.selection`). If
the runs' recorded ``choices`` (:func:`dgkit.labels.algorithm_choices`: method, adapter, augmentation, backbone,
initial weights) differ, selection would silently pick between two algorithms, e.g. ERM and ERM+BSS under a
hand-set ``tag=``. :func:`mixed_rows` names such rows; run folders written before ``choices`` existed are
ignored.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from dgkit.eval.records import Run

UNSET = "<unset>"
"""The value shown for a choice that some runs of a row do not record."""


def mixed_rows(runs: Iterable[Run]) -> list[str]:
    """One warning per ``(dataset, tag)`` row whose runs record different algorithm ``choices``.

    Each warning names the row, every differing key with each of its values, and for each value the number of
    runs and an example run path. Runs with empty ``choices`` (older folders) are left out; a row whose runs
    differ only in ``hparams`` id, seed or test domains gives no warning.

    Args:
        runs: loaded runs (:func:`dgkit.eval.load_runs`), in any order.

    Returns:
        The warnings, sorted by dataset then tag; empty when every row holds one algorithm.
    """
    rows: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        if run.choices:
            rows[(run.dataset, run.tag)].append(run)
    warnings = []
    for (dataset, tag), members in sorted(rows.items()):
        parts = _differing_keys(sorted(members, key=lambda r: r.path))
        if parts:
            warnings.append(
                f"row {tag!r} of dataset {dataset!r} mixes algorithms (selection would treat them as hyper-parameter "
                f"candidates of one; give each its own tag=): {'; '.join(parts)}"
            )
    return warnings


def _differing_keys(runs: list[Run]) -> list[str]:
    """``"<key>: <value> (<n> runs, e.g. <path>) vs ..."`` for each choice whose value differs among ``runs``."""
    keys = sorted({key for run in runs for key in run.choices})
    parts = []
    for key in keys:
        by_value: dict[str, list[Path]] = defaultdict(list)
        for run in runs:
            by_value[run.choices.get(key, UNSET)].append(run.path)
        if len(by_value) > 1:
            values = " vs ".join(
                f"{value} ({len(paths)} run{'s' if len(paths) > 1 else ''}, e.g. {paths[0]})"
                for value, paths in sorted(by_value.items())
            )
            parts.append(f"{key}: {values}")
    return parts
