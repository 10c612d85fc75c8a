"""A finished run's outcome: the step chosen by training-domain validation and the run summary table.

This is DomainBed's training-domain validation applied to one run (argmax over its evaluations of the mean
``out`` score of the source domains); the held-out score reported is the test domain's ``in`` split at that step
(DomainBed's convention). The score is the task's metric (``metric``: the record key, e.g. ``acc``), named in
``final.json`` so every reader knows what it holds.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

SPLITS = ("in", "out")


def source_val_score(record: dict[str, Any], sources: list[str], metric: str) -> float:
    """Mean ``out`` score over the source domains of one evaluation record."""
    return sum(record[f"{metric}/{d}/out"] for d in sources) / len(sources)


def summarise_run(
    records: list[dict], domains: list[str], test_domains: list[str], metric: str, metric_name: str
) -> dict[str, Any]:
    """The ``final.json`` content for a run's evaluation records.

    Args:
        records: the run's ``results.jsonl`` records.
        domains: every domain, in order; test_domains: the held-out ones.
        metric: the task's record key (``acc``); metric_name: its readable name (``accuracy``).
    """
    if not records:
        raise ValueError("the run has no evaluation records (was trainer.val_check_interval > trainer.max_steps?)")
    sources = [d for d in domains if d not in test_domains]
    best = max(records, key=lambda r: (source_val_score(r, sources, metric), -r["step"]))
    last = max(records, key=lambda r: r["step"])
    return {
        "selection": "training-domain validation",
        "metric": metric,
        "metric_name": metric_name,
        "step": best["step"],
        "val_score": source_val_score(best, sources, metric),
        "test_score": {t: best[f"{metric}/{t}/in"] for t in test_domains},
        "test_score_mean": sum(best[f"{metric}/{t}/in"] for t in test_domains) / len(test_domains),
        "last_step": last["step"],
        "last_test_score": {t: last[f"{metric}/{t}/in"] for t in test_domains},
        "scores": {d: {s: best.get(f"{metric}/{d}/{s}") for s in SPLITS} for d in domains},
        "secondary_scores": _secondary(best, metric),
    }


def _secondary(record: dict[str, Any], metric: str) -> dict[str, dict[str, dict[str, float]]]:
    """``{key: {domain: {split: value}}}`` of the record's secondary scores (``dice/<domain>/<split>``...)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, value in record.items():
        parts = name.split("/")
        if len(parts) == 3 and parts[0] != metric:
            key, domain, split = parts
            out.setdefault(key, {}).setdefault(domain, {})[split] = value
    return out


def print_summary(final: dict[str, Any], domains: list[str], test_domains: list[str], console: Console | None = None):
    """Print the per-domain score table of the selected step."""
    final = _with_current_keys(final)
    name = final["metric_name"]
    table = Table(title=f"{name} at step {final['step']} (chosen by training-domain validation)")
    for column in ("domain", "role", *SPLITS):
        table.add_column(column, justify="left" if column in ("domain", "role") else "right")
    for d in domains:
        score = final["scores"][d]
        cells = [f"{100 * score[s]:.1f}" if score[s] is not None else "-" for s in SPLITS]
        table.add_row(d, "held out" if d in test_domains else "source", *cells)
    console = console or Console()
    console.print(table)
    console.print(
        f"held-out {name} (test domain 'in' split): {100 * final['test_score_mean']:.1f}% | "
        f"source validation: {100 * final['val_score']:.1f}%"
    )


_LEGACY_KEYS = {"val_acc": "val_score", "test_acc_mean": "test_score_mean", "accuracies": "scores"}


def _with_current_keys(final: dict[str, Any]) -> dict[str, Any]:
    """A ``final.json`` written before runs named their metric (accuracy keys), in today's keys."""
    out = {"metric_name": "accuracy", **final}
    for old, new in _LEGACY_KEYS.items():
        if new not in out and old in out:
            out[new] = out[old]
    return out
