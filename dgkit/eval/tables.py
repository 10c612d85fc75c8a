"""DomainBed-style result tables (``collect_results.py`` of Gulrajani & Lopez-Paz, 2021): data, markdown, CSV, plot.

One table per (dataset, selection rule): a row per tag, a column per domain of the dataset (in the dataset's
order) and ``Avg``. A cell is ``100·mean ± 100·SE`` of the selected test score over seeds (the runs' metric:
accuracy for classification, mIoU for segmentation; each table names it), with
SE = population std (ddof=0) / √n_seeds; a cell with one seed is ``100·mean (1 seed)`` (DomainBed prints a
misleading ``± 0.0`` there); a cell with no seed is ``X``; ``Avg`` is the mean of the domain
means, without an error bar, and ``X`` when a domain is missing. Like DomainBed, a cell averages the seeds
that have a result (the CSV gives ``n_seeds``).

:func:`summarise` returns the numbers as a nested dict; :func:`to_markdown`, :func:`to_csv`,
:func:`plot_dataset` and :func:`write_report` render it.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dgkit.eval.records import Run, check_consistency
from dgkit.eval.selection import RULES, Choice, SelectionRule, TrainingDomainValidation, group_runs
from dgkit.utils.io import atomic_write, atomic_write_text

MISSING = "X"
CSV_COLUMNS = ("dataset", "rule", "tag", "test_domain", "mean", "se", "n_seeds", "val_mean", "n_candidates")
LEGEND = (
    "Cells: 100 × mean ± SE of the selected test-domain score (`in` split; the metric each table names) over seeds, "
    "SE = population std / √n_seeds; (1 seed) = no SE; X = no result; Avg = mean of the domain means."
)


@dataclass(frozen=True)
class Cell:
    """One table cell: mean and SE in percent over the seeds that have a result, and each seed's choice."""

    mean: float
    se: float
    n_seeds: int
    choices: dict[int, Choice] = field(default_factory=dict, compare=False)
    n_candidates: int = 0
    """Hyper-parameter candidates (``hparams`` ids) of the fold, the most any seed had."""

    @property
    def val_mean(self) -> float:
        """Mean over seeds of the validation score that selected each choice, in percent (the rule's own:
        source ``out`` for training-domain validation)."""
        return 100.0 * sum(c.val_score for c in self.choices.values()) / len(self.choices) if self.choices else 0.0


Summary = dict[str, dict[str, dict[str, dict[str, Cell | None]]]]
"""``summary[dataset][rule name][tag][test domain]`` -> :class:`Cell` or None (missing)."""


def mean_se(scores: Sequence[float]) -> tuple[float, float]:
    """``(100·mean, 100·std/√n)`` of scores in [0, 1], std with ddof=0 (DomainBed's ``format_mean``)."""
    if not scores:
        raise ValueError("mean_se needs at least one score")
    values = np.asarray(scores, dtype=float)
    return 100.0 * float(values.mean()), 100.0 * float(values.std() / math.sqrt(len(values)))


def format_cell(cell: Cell | None) -> str:
    """``"85.3 ± 0.4"``; ``"85.3 (1 seed)"`` when one seed gives no standard error; ``"X"`` when missing."""
    if cell is None:
        return MISSING
    if cell.n_seeds == 1:
        return f"{cell.mean:.1f} (1 seed)"
    return f"{cell.mean:.1f} ± {cell.se:.1f}"


def row_average(row: dict[str, Cell | None]) -> float | None:
    """Mean of a row's domain means (percent), or None when a domain is missing."""
    if not row or any(cell is None for cell in row.values()):
        return None
    return sum(cell.mean for cell in row.values()) / len(row)


def summarise(runs: Iterable[Run], rules: Sequence[SelectionRule] = RULES) -> Summary:
    """Apply every rule to every (dataset, tag, seed, test domain) and aggregate over seeds.

    Returns:
        ``{dataset: {rule.name: {tag: {domain: Cell | None}}}}``: datasets and tags sorted, domains in the
        dataset's order, every domain present (None when no seed has a result). A rule with no result for a
        dataset keeps its all-None rows (renderers omit its table).

    Raises:
        RecordsError: runs disagree on a dataset's domains, or a run appears twice.
    """
    runs = list(runs)
    domains = check_consistency(runs)
    groups = group_runs(runs)
    summary: Summary = {}
    for dataset in sorted(domains):
        tags = sorted({tag for (ds, tag, _) in groups if ds == dataset})
        summary[dataset] = {}
        for rule in rules:
            summary[dataset][rule.name] = {
                tag: {t: _cell(rule, groups, dataset, tag, t) for t in domains[dataset]} for tag in tags
            }
    return summary


def to_markdown(summary: Summary, rules: Sequence[SelectionRule] = RULES, metrics: dict[str, str] | None = None) -> str:
    """Every table as markdown, a ``### <dataset> — <rule name>`` heading each (empty tables give a note).

    Args:
        metrics: ``{dataset: metric name}`` (:func:`~dgkit.eval.records.dataset_metrics`), printed under each
            heading.
    """
    why = {rule.name: rule.unavailable for rule in rules}
    parts = ["# Results", "", LEGEND, ""]
    for dataset, by_rule in summary.items():
        for rule_name, rows in by_rule.items():
            parts.append(f"### {dataset} — {rule_name}")
            parts.append("")
            if metrics and dataset in metrics:
                parts.extend([f"Test-domain {metrics[dataset]} (%).", ""])
            if _is_empty(rows):
                parts.append(f"_Table omitted: {why.get(rule_name, 'no result')}._")
            else:
                parts.extend(_markdown_table(rows))
                what = _VALIDATION.get(rule_name, "validation")
                parts.extend(["", f"Selection score (%) behind each cell ({what}); [n]: the fold's candidates:", ""])
                parts.extend(
                    _markdown_table(rows, value=lambda c: f"{c.val_mean:.1f} [{c.n_candidates}]", average=False)
                )
            parts.append("")
    return "\n".join(parts)


def to_csv(summary: Summary) -> str:
    """Long-format CSV: one line per non-missing cell, ``mean`` and ``se`` in percent (4 decimals)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for dataset, by_rule in summary.items():
        for rule_name, rows in by_rule.items():
            for tag, row in rows.items():
                for domain, cell in row.items():
                    if cell is not None:
                        mean, se = round(cell.mean, 4), round(cell.se, 4)
                        val = round(cell.val_mean, 4)
                        row = [dataset, rule_name, tag, domain, mean, se, cell.n_seeds, val, cell.n_candidates]
                        writer.writerow(row)
    return buffer.getvalue()


def plot_dataset(
    summary: Summary, dataset: str, path: str | os.PathLike, rule: str | None = None, metric_name: str = "score"
) -> Path | None:
    """Grouped bar chart (a group per test domain, a bar per tag, error bar = SE) written atomically as PNG.

    Args:
        rule: the rule name to plot; training-domain validation by default.
        metric_name: the y axis label's metric (``accuracy``, ``mIoU``).

    Returns:
        The path written, or None when the rule has no result for ``dataset`` (nothing is written).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend state
    from matplotlib.figure import Figure

    rule = rule or TrainingDomainValidation.name
    rows = summary[dataset][rule]
    if _is_empty(rows):
        return None
    domains = list(next(iter(rows.values())))
    x = np.arange(len(domains))
    width = 0.8 / len(rows)
    fig = Figure(figsize=(max(5.0, 2.2 + len(domains) * (0.4 + 0.25 * len(rows))), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (tag, row) in enumerate(rows.items()):
        heights = [cell.mean if cell else np.nan for cell in row.values()]
        errors = [cell.se if cell else 0.0 for cell in row.values()]
        offsets = x + (i - (len(rows) - 1) / 2) * width
        ax.bar(offsets, heights, width, yerr=errors, capsize=3, label=tag)
        for pos, height in zip(offsets, heights):
            if np.isnan(height):  # a missing cell, marked as in the tables
                ax.text(pos, 1, MISSING, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, domains)
    ax.set_xlim(-0.5, len(domains) - 0.5)  # autoscaling ignores the slots of missing (NaN) bars
    ax.set_xlabel("test domain")
    ax.set_ylabel(f"test {metric_name} (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{dataset} — {rule}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), title="error bar: SE", title_fontsize=7)
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120), binary=True)


def write_report(
    summary: Summary,
    out_dir: str | os.PathLike,
    rules: Sequence[SelectionRule] = RULES,
    metrics: dict[str, str] | None = None,
) -> list[Path]:
    """Write ``results.md``, ``results.csv`` and ``<dataset>.png`` (where it has data) into ``out_dir``.

    Args:
        metrics: ``{dataset: metric name}`` for the headings and plot axes.
    """
    out_dir = Path(out_dir)
    metrics = metrics or {}
    written = [
        atomic_write_text(out_dir / "results.md", to_markdown(summary, rules, metrics)),
        atomic_write_text(out_dir / "results.csv", to_csv(summary)),
    ]
    for dataset in summary:
        if TrainingDomainValidation.name in summary[dataset]:
            png = plot_dataset(
                summary, dataset, out_dir / f"{safe_file_name(dataset)}.png", metric_name=metrics.get(dataset, "score")
            )
            if png is not None:
                written.append(png)
    return written


def _cell(
    rule: SelectionRule, groups: dict[tuple[str, str, int], list[Run]], dataset: str, tag: str, test_domain: str
) -> Cell | None:
    """Select per seed for one (dataset, tag, test domain) and aggregate the chosen test scores."""
    choices, candidates = {}, 0
    for (ds, group_tag, seed), runs in groups.items():
        if ds == dataset and group_tag == tag:
            choice = rule.select(runs, test_domain)
            if choice is not None:
                choices[seed] = choice
                candidates = max(candidates, len({r.hparams for r in runs if r.test_domains == (test_domain,)}))
    if not choices:
        return None
    mean, se = mean_se([c.test_score for c in choices.values()])
    return Cell(mean=mean, se=se, n_seeds=len(choices), choices=choices, n_candidates=candidates)


def _is_empty(rows: dict[str, dict[str, Cell | None]]) -> bool:
    """True when no cell of a table has a result."""
    return all(cell is None for row in rows.values() for cell in row.values())


_VALIDATION = {
    "training-domain validation set": "mean source-domain `out` score",
    "leave-one-domain-out cross-validation": "mean `in` score of the other held-out domain",
    "test-domain validation set (oracle)": "the held-out domain's `out` score",
    "crafted-shift validation": "mean source-domain `out` score under unseen augmentation families",
}


def _markdown_table(
    rows: dict[str, dict[str, Cell | None]], value: Callable[[Cell], str] = format_cell, average: bool = True
) -> list[str]:
    """The lines of one markdown table (``value`` renders a cell), columns padded to equal width."""
    domains = list(next(iter(rows.values())))
    table = [["Algorithm", *domains, *(["Avg"] if average else [])]]
    for tag, row in rows.items():
        cells = [MISSING if c is None else value(c) for c in row.values()]
        if average:
            avg = row_average(row)
            cells.append(MISSING if avg is None else f"{avg:.1f}")
        table.append([tag, *cells])
    widths = [max(3, *(len(line[j]) for line in table)) for j in range(len(table[0]))]
    rule_line = [":" + "-" * (widths[0] - 1)] + ["-" * (w - 1) + ":" for w in widths[1:]]
    lines = [table[0], rule_line, *table[1:]]
    return [
        "| " + " | ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(line, widths))) + " |"
        for line in lines
    ]


def safe_file_name(name: str) -> str:
    """``name`` usable as a file name (path separators and odd characters become ``_``)."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name).strip(".") or "dataset"
