"""How well does a selection rule choose? Rank correlation and regret over a sweep's candidates.

For one held-out fold ``t`` (the runs holding out ``t`` alone, one seed), every evaluation of every candidate is
a point (validation score of the rule, held-out ``in`` score). :func:`rule_quality` gives

- the Spearman rank correlation between the rule's validation score and the held-out score over those points
  (the test-domain oracle scores only each candidate's last evaluation, as it selects);
- the regret: the best held-out score among all evaluations minus the held-out score of the rule's choice.

``scripts/selection_study.py`` prints them per fold and rule for a sweep, and draws :func:`rule_scatter`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scipy.stats import spearmanr

from dgkit.eval.records import Run
from dgkit.eval.selection import SelectionRule


@dataclass(frozen=True)
class RuleQuality:
    """One rule on one fold: rank correlation (``nan`` when undefined), regret and the points it scored."""

    spearman: float
    regret: float
    points: int


def rule_quality(rule: SelectionRule, runs: Sequence[Run], t: str) -> RuleQuality | None:
    """The rule's quality on fold ``t`` of ``runs`` (one dataset, tag and seed), or ``None`` when it cannot
    choose there. The points are the rule's own :meth:`~dgkit.eval.selection.SelectionRule.candidates`."""
    points = [(c.val_score, c.test_score) for c in rule.candidates(runs, t)]
    choice = rule.select(runs, t)
    if choice is None:
        return None
    best = max(run.score(rec, t, "in") for run in runs if run.test_domains == (t,) for rec in run.records)
    vals, scores = zip(*points)
    rho = float(spearmanr(vals, scores).statistic) if len(set(vals)) > 1 and len(set(scores)) > 1 else float("nan")
    return RuleQuality(spearman=rho, regret=best - choice.test_score, points=len(points))


def rule_scatter(rules: Sequence[SelectionRule], runs: Sequence[Run], folds: Sequence[str], title: str = ""):
    """A matplotlib ``Figure``: one panel per rule, every point a (validation score, held-out ``in`` score) pair
    the rule scores (×100), coloured by held-out fold, its choice per fold ringed. A rule without points in any
    fold gets an empty panel that says so."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend state
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.0 * len(rules), 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(rules), squeeze=False)[0]
    colours = [f"C{i}" for i in range(len(folds))]
    for ax, rule in zip(axes, rules):
        plotted = False
        for t, colour in zip(folds, colours):
            points = [(100 * c.val_score, 100 * c.test_score) for c in rule.candidates(runs, t)]
            if not points:
                continue
            plotted = True
            ax.scatter(*zip(*points), s=12, color=colour, alpha=0.7, label=t)
            choice = rule.select(runs, t)
            ax.scatter([100 * choice.val_score], [100 * choice.test_score], s=70, facecolors="none", edgecolors=colour)
        if not plotted:
            ax.text(0.5, 0.5, "no runs for this rule", ha="center", va="center", transform=ax.transAxes, fontsize=8)
        ax.set_title(rule.name, fontsize=9)
        ax.set_xlabel("validation score (%)", fontsize=8)
        ax.set_ylabel(f"held-out {runs[0].metric if runs else 'score'} (%)", fontsize=8)
        ax.tick_params(labelsize=7)
    handles, labels = next((a.get_legend_handles_labels() for a in axes if a.get_legend_handles_labels()[0]), ([], []))
    if handles:
        fig.legend(handles, labels, fontsize=7, loc="outside right upper", title="held out", title_fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
