"""How well does a selection rule choose? Rank correlation and regret over a sweep's candidates.

For one held-out fold ``t`` (the runs holding out ``t`` alone, one seed), every evaluation of every candidate is
a point (validation score of the rule, held-out ``in`` score). :func:`rule_quality` gives

- the Spearman rank correlation between the rule's validation score and the held-out score over those points
  (the test-domain oracle scores only each candidate's last evaluation, as it selects);
- the regret: the best held-out score among all evaluations minus the held-out score of the rule's choice.

``scripts/selection_study.py`` prints them per fold and rule for a sweep.
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
