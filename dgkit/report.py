"""A finished run's outcome: the step chosen by training-domain validation and the run summary table.

This is DomainBed's training-domain validation applied to one run (argmax over its evaluations of the
mean ``out`` accuracy of the source domains); the held-out accuracy reported is the test domain's ``in``
split at that step (DomainBed's convention).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def source_val_acc(record: dict[str, Any], sources: list[str]) -> float:
    """Mean ``out`` accuracy over the source domains of one evaluation record."""
    return sum(record[f"acc/{d}/out"] for d in sources) / len(sources)


def summarise_run(records: list[dict], domains: list[str], test_domains: list[str]) -> dict[str, Any]:
    """The ``final.json`` content for a run's evaluation records."""
    if not records:
        raise ValueError("the run has no evaluation records (was trainer.val_check_interval > trainer.max_steps?)")
    sources = [d for d in domains if d not in test_domains]
    best = max(records, key=lambda r: (source_val_acc(r, sources), -r["step"]))
    last = max(records, key=lambda r: r["step"])
    return {
        "selection": "training-domain validation",
        "step": best["step"],
        "val_acc": source_val_acc(best, sources),
        "test_acc": {t: best[f"acc/{t}/in"] for t in test_domains},
        "test_acc_mean": sum(best[f"acc/{t}/in"] for t in test_domains) / len(test_domains),
        "last_step": last["step"],
        "last_test_acc": {t: last[f"acc/{t}/in"] for t in test_domains},
        "accuracies": {d: {s: best.get(f"acc/{d}/{s}") for s in ("in", "out")} for d in domains},
    }


def print_summary(final: dict[str, Any], domains: list[str], test_domains: list[str], console: Console | None = None):
    """Print the per-domain accuracy table of the selected step."""
    table = Table(title=f"accuracy at step {final['step']} (chosen by training-domain validation)")
    for column in ("domain", "role", "in", "out"):
        table.add_column(column, justify="left" if column in ("domain", "role") else "right")
    for d in domains:
        acc = final["accuracies"][d]
        cells = [f"{100 * acc[s]:.1f}" if acc[s] is not None else "-" for s in ("in", "out")]
        table.add_row(d, "held out" if d in test_domains else "source", *cells)
    console = console or Console()
    console.print(table)
    console.print(
        f"held-out accuracy (test domain 'in' split): {100 * final['test_acc_mean']:.1f}% | "
        f"source validation: {100 * final['val_acc']:.1f}%"
    )
