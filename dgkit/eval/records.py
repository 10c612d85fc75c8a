"""Find and load the runs of a sweep: ``run.json``, ``results.jsonl`` and the ``done`` marker.

A run directory (at any depth below the sweep root) holds

- ``run.json``: ``{"dataset", "domains" (ordered), "test_domains" (one or two), "seed", "tag", "hparams"}``, and
  since the task abstraction ``"metric"`` (the task's selection metric key, e.g. ``acc`` or ``miou``),
  ``"metric_name"`` (its name in table headings) and ``"choices"`` (the algorithm-defining config choices, see
  :func:`dgkit.labels.algorithm_choices`). Older run folders lack them: their metric is ``acc`` (accuracy);
- ``results.jsonl``: one record per evaluation, ``{"step", "epoch", "<metric>/<domain>/<in|out>", ...}`` with the
  score (in [0, 1]) of the ``in`` (80 %) and ``out`` (20 %) split of every domain;
- ``done``: an empty marker written last, when the run finished.

Runs with equal ``dataset``, ``tag`` and ``hparams`` differ only in seed and test domains; different
``hparams`` ids under one tag are the hyper-parameter candidates that model selection chooses between
(DomainBed's ``hparams_seed``). Malformed files raise :class:`RecordsError` naming the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RUN_FILE = "run.json"
RESULTS_FILE = "results.jsonl"
DONE_FILE = "done"
VARIANTS_DIR = "variants"
"""A run's derived models (compressed, exported): each a run folder below it (dgkit.variants)."""
LEGACY_METRIC = ("acc", "accuracy")
"""The metric of run folders written before runs recorded theirs (classification accuracy)."""


class RecordsError(ValueError):
    """A run directory whose files do not follow the run contract."""


@dataclass(frozen=True)
class Run:
    """One training run: its ``run.json`` fields, its evaluation records and where it lives."""

    dataset: str
    domains: tuple[str, ...]
    test_domains: tuple[str, ...]
    seed: int
    tag: str
    hparams: str
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)
    path: Path = Path(".")
    done: bool = False
    metric: str = LEGACY_METRIC[0]
    metric_name: str = LEGACY_METRIC[1]
    choices: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def sources(self) -> tuple[str, ...]:
        """The training domains: every domain that is not a test domain."""
        return tuple(d for d in self.domains if d not in self.test_domains)

    def score(self, record: dict[str, Any], domain: str, split: str) -> float:
        """The run's metric on one split of one domain in one of its evaluation records."""
        return record[f"{self.metric}/{domain}/{split}"]


def find_run_dirs(root: str | os.PathLike) -> list[Path]:
    """Every directory below ``root`` (``root`` included) that holds a ``run.json``, sorted.

    The walk does not descend into a run directory (its checkpoints and logs hold no further runs), except into
    its ``variants/`` folder: the run's compressed and exported models, each a run folder (:mod:`dgkit.variants`).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such directory: {root}")
    found = []
    for current, dirs, files in os.walk(root):
        if RUN_FILE in files:
            found.append(Path(current))
            dirs[:] = [d for d in dirs if d == VARIANTS_DIR]
        else:
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return sorted(found)


def load_run(path: str | os.PathLike) -> Run:
    """Load the run in directory ``path`` (its ``results.jsonl`` may be missing: no records yet)."""
    path = Path(path)
    meta = _read_run_json(path / RUN_FILE)
    records = _read_results(path / RESULTS_FILE, meta["domains"], meta["metric"])
    return Run(**meta, records=records, path=path, done=(path / DONE_FILE).exists())


def load_runs(root: str | os.PathLike) -> list[Run]:
    """Load every run below ``root``, finished or not (see :func:`split_finished`)."""
    return [load_run(p) for p in find_run_dirs(root)]


def split_finished(runs: Iterable[Run]) -> tuple[list[Run], list[Run]]:
    """``(finished, unfinished)``: runs with and without the ``done`` marker."""
    runs = list(runs)
    return [r for r in runs if r.done], [r for r in runs if not r.done]


def check_consistency(runs: Iterable[Run]) -> dict[str, tuple[str, ...]]:
    """Check that runs agree on each dataset's domain order and that no run appears twice.

    Returns:
        ``{dataset: domains}`` in the order datasets are first seen (sorted by path).

    Raises:
        RecordsError: two runs of one dataset list different domains or metrics, or two runs share dataset,
            tag, hparams, seed and test domains (e.g. one sweep copied into another).
    """
    domains: dict[str, tuple[str, ...]] = {}
    first_path: dict[str, Path] = {}
    seen: dict[tuple, Path] = {}
    runs_sorted = sorted(runs, key=lambda r: r.path)
    for run in runs_sorted:
        if run.dataset not in domains:
            domains[run.dataset], first_path[run.dataset] = run.domains, run.path
        elif domains[run.dataset] != run.domains:
            raise RecordsError(
                f"{run.path / RUN_FILE}: domains {list(run.domains)} differ from {list(domains[run.dataset])} "
                f"in {first_path[run.dataset] / RUN_FILE} (same dataset {run.dataset!r})"
            )
        first = next(r for r in runs_sorted if r.dataset == run.dataset)
        if first.metric != run.metric:
            raise RecordsError(
                f"{run.path / RUN_FILE}: metric {run.metric!r} differs from {first.metric!r} in "
                f"{first.path / RUN_FILE} (same dataset {run.dataset!r}); one table compares one metric"
            )
        key = (run.dataset, run.tag, run.hparams, run.seed, frozenset(run.test_domains))
        if key in seen:
            raise RecordsError(
                f"duplicate run: {seen[key]} and {run.path} share dataset, tag, hparams, seed and test domains"
            )
        seen[key] = run.path
    return domains


def dataset_metrics(runs: Iterable[Run]) -> dict[str, str]:
    """``{dataset: metric name}`` (e.g. ``accuracy``, ``mIoU``) for table headings and plot axes."""
    return {run.dataset: run.metric_name for run in sorted(runs, key=lambda r: r.path)}


def _read_run_json(file: Path) -> dict[str, Any]:
    """Parse and validate ``run.json``; return the :class:`Run` fields it defines."""
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RecordsError(f"{file}: not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise RecordsError(f"{file}: expected a JSON object, got {type(raw).__name__}")
    missing = [k for k in ("dataset", "domains", "test_domains", "seed", "tag", "hparams") if k not in raw]
    if missing:
        raise RecordsError(f"{file}: missing key(s) {missing}")
    for key in ("dataset", "tag"):
        if not isinstance(raw[key], str) or not raw[key]:
            raise RecordsError(f"{file}: {key!r} must be a non-empty string, got {raw[key]!r}")
    if not isinstance(raw["hparams"], str | int) or isinstance(raw["hparams"], bool):
        raise RecordsError(f"{file}: 'hparams' must be a string id, got {raw['hparams']!r}")
    if not isinstance(raw["seed"], int) or isinstance(raw["seed"], bool):
        raise RecordsError(f"{file}: 'seed' must be an integer, got {raw['seed']!r}")
    domains = _str_list(file, "domains", raw["domains"])
    test_domains = _str_list(file, "test_domains", raw["test_domains"])
    if len(domains) < 2:
        raise RecordsError(f"{file}: 'domains' needs at least two domains, got {domains}")
    unknown = [d for d in test_domains if d not in domains]
    if unknown:
        raise RecordsError(f"{file}: test domain(s) {unknown} not in domains {domains}")
    if not 1 <= len(test_domains) <= 2 or len(test_domains) >= len(domains):
        raise RecordsError(
            f"{file}: 'test_domains' must name one or two domains and leave a source domain, got {test_domains}"
        )
    metric, metric_name = raw.get("metric", LEGACY_METRIC[0]), raw.get("metric_name", LEGACY_METRIC[1])
    for key, value in (("metric", metric), ("metric_name", metric_name)):
        if not isinstance(value, str) or not value or "/" in value:
            raise RecordsError(f"{file}: {key!r} must be a non-empty name without '/', got {value!r}")
    choices = raw.get("choices", {})
    if not isinstance(choices, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in choices.items()):
        raise RecordsError(f"{file}: 'choices' must map config groups to strings, got {choices!r}")
    return {
        "dataset": raw["dataset"],
        "domains": tuple(domains),
        "test_domains": tuple(test_domains),
        "seed": raw["seed"],
        "tag": raw["tag"],
        "hparams": str(raw["hparams"]),
        "metric": metric,
        "metric_name": metric_name,
        "choices": dict(choices),
    }


def _str_list(file: Path, key: str, value: Any) -> list[str]:
    """``value`` as a list of distinct non-empty strings, or a :class:`RecordsError`."""
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise RecordsError(f"{file}: {key!r} must be a list of domain names, got {value!r}")
    if len(set(value)) != len(value):
        raise RecordsError(f"{file}: {key!r} repeats a domain: {value}")
    return value


def _read_results(file: Path, domains: list[str] | tuple[str, ...], metric: str) -> list[dict[str, Any]]:
    """Parse and validate ``results.jsonl`` (sorted by step); a missing file is no records."""
    if not file.exists():
        return []
    records: list[dict[str, Any]] = []
    steps: set[int] = set()
    with open(file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{file}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise RecordsError(f"{where}: not valid JSON ({err})") from err
            _check_record(where, record, domains, metric)
            if record["step"] in steps:
                raise RecordsError(f"{where}: step {record['step']} appears twice")
            steps.add(record["step"])
            records.append(record)
    return sorted(records, key=lambda r: r["step"])


def _check_record(where: str, record: Any, domains: list[str] | tuple[str, ...], metric: str) -> None:
    """Raise :class:`RecordsError` unless ``record`` has an integer step and every score in [0, 1]."""
    if not isinstance(record, dict):
        raise RecordsError(f"{where}: expected a JSON object, got {type(record).__name__}")
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        raise RecordsError(f"{where}: 'step' must be an integer, got {step!r}")
    for domain in domains:
        for split in ("in", "out"):
            key = f"{metric}/{domain}/{split}"
            if key not in record:
                raise RecordsError(f"{where}: missing {key!r} (every record holds both splits of every domain)")
            value = record[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise RecordsError(f"{where}: {key!r} must be a score in [0, 1], got {value!r}")
