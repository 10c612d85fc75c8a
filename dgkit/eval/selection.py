"""DomainBed's three model-selection rules (Gulrajani & Lopez-Paz, "In Search of Lost Domain Generalization", 2021),
and crafted-shift validation (Efthymiadis et al., WACV 2025) as a fourth.

Each rule scores one group of runs: one dataset, one tag (the table row), one seed (DomainBed's trial seed)
and one test domain ``t``. The group holds every hyper-parameter candidate (``hparams`` id). A rule picks a
``(hparams, step)`` by a validation score and reports the test score there, which is always the test
domain's ``in`` split (``<metric>/t/in``, 80 % of the domain), as DomainBed's ``model_selection.py`` does. The
score is the run's own metric (``Run.metric``: accuracy for classification, mIoU for segmentation), written
``m`` below:

- :class:`TrainingDomainValidation` (``IIDAccuracySelectionMethod``): every evaluation of every run with the
  single test domain ``t``; val = mean ``m/<d>/out`` over the source domains; early stopping allowed.
- :class:`LeaveOneDomainOut` (``LeaveOneOutSelectionMethod``): per hparams id and step, val = mean over the
  other domains ``v`` of ``m/v/in`` from the run trained with test domains ``{t, v}``; needs all of them.
- :class:`TestDomainOracle` (``OracleSelectionMethod``): the last evaluation of each candidate only;
  val = ``m/t/out``. One test-domain query per candidate, so it can come out below training-domain
  validation.

Ties go to the first candidate in (hparams id, step) order, i.e. the smallest id, then the earliest step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

from dgkit.eval.records import Run


@dataclass(frozen=True)
class Choice:
    """The evaluation a rule selected: its validation and test score (the runs' metric, in [0, 1]), step and
    hparams id."""

    val_score: float
    test_score: float
    step: int
    hparams: str


class SelectionRule(ABC):
    """A model-selection rule: :meth:`candidates` scores every evaluation it may choose among the runs of one
    (dataset, tag, seed) for a test domain; :meth:`select` takes the best."""

    name: ClassVar[str]
    """The rule's name in table headings (DomainBed's wording)."""
    key: ClassVar[str]
    """A short identifier (``iid``, ``lodo``, ``oracle``)."""
    unavailable: ClassVar[str] = "no run with a single test domain has an evaluation"
    """Why a table for this rule can be empty (printed in place of the table)."""

    @abstractmethod
    def candidates(self, runs: Sequence[Run], test_domain: str) -> Iterable[Choice]:
        """Every evaluation the rule may choose for ``test_domain``, with its validation and test score.

        Args:
            runs: every run of the group, whatever its test domains; the rule takes those it needs.
            test_domain: the held-out domain ``t`` whose ``<metric>/t/in`` is reported.
        """

    def select(self, runs: Sequence[Run], test_domain: str) -> Choice | None:
        """The chosen evaluation for ``test_domain`` among ``runs`` (one dataset, tag and seed), or None: the first
        candidate with the highest validation score."""
        return _argmax(self.candidates(runs, test_domain))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class TrainingDomainValidation(SelectionRule):
    """Argmax over (hparams, step) of the mean ``out`` score of the source domains."""

    name = "training-domain validation set"
    key = "iid"

    def candidates(self, runs: Sequence[Run], test_domain: str) -> Iterable[Choice]:
        """See :meth:`SelectionRule.candidates`."""
        return _source_split_candidates(runs, test_domain, "out")


class TestDomainOracle(SelectionRule):
    """Argmax over hparams of the test domain's ``out`` score at each candidate's last evaluation."""

    name = "test-domain validation set (oracle)"
    key = "oracle"
    __test__ = False  # not a pytest class despite its name

    def candidates(self, runs: Sequence[Run], test_domain: str) -> Iterable[Choice]:
        """See :meth:`SelectionRule.candidates`."""
        for run in _single_test_runs(runs, test_domain):
            if not run.records:
                continue
            last = max(run.records, key=lambda r: r["step"])
            val, test = run.score(last, test_domain, "out"), run.score(last, test_domain, "in")
            yield Choice(val_score=val, test_score=test, step=last["step"], hparams=run.hparams)


class LeaveOneDomainOut(SelectionRule):
    """Argmax over (hparams, step) of the mean ``in`` score of each other domain held out with ``t``."""

    name = "leave-one-domain-out cross-validation"
    key = "lodo"
    unavailable = "needs runs with two test domains {t, v} for every pair; none were found"

    def candidates(self, runs: Sequence[Run], t: str) -> Iterable[Choice]:
        """Every (hparams, step) where the single run and all n-1 pair runs have an evaluation."""
        for single in _single_test_runs(runs, t):
            others = [v for v in single.domains if v != t]
            pairs = {
                v: run
                for run in runs
                if run.hparams == single.hparams and len(run.test_domains) == 2 and t in run.test_domains
                for v in run.test_domains
                if v != t
            }
            if any(v not in pairs for v in others):
                continue
            pair_steps = {v: {rec["step"]: rec for rec in pairs[v].records} for v in others}
            for rec in _by_step(single.records):
                step = rec["step"]
                if any(step not in pair_steps[v] for v in others):
                    continue
                val = sum(pairs[v].score(pair_steps[v][step], v, "in") for v in others) / len(others)
                yield Choice(val_score=val, test_score=single.score(rec, t, "in"), step=step, hparams=single.hparams)


class CraftedShiftValidation(SelectionRule):
    """Argmax over (hparams, step) of the mean ``crafted`` score of the source domains: their ``out`` images under
    augmentation families training never used (Efthymiadis et al., WACV 2025; :mod:`dgkit.data.crafted`).

    Only evaluations that hold the crafted splits count (runs trained with ``+validation=crafted``).
    """

    name = "crafted-shift validation"
    key = "crafted"
    unavailable = "needs runs trained with crafted-shift validation sets (+validation=crafted); none were found"

    def candidates(self, runs: Sequence[Run], test_domain: str) -> Iterable[Choice]:
        """See :meth:`SelectionRule.candidates`."""
        return _source_split_candidates(runs, test_domain, "crafted")


RULES: tuple[SelectionRule, ...] = (
    TrainingDomainValidation(),
    LeaveOneDomainOut(),
    TestDomainOracle(),
    CraftedShiftValidation(),
)
"""DomainBed's three rules in its table order, then crafted-shift validation."""


def group_runs(runs: Iterable[Run]) -> dict[tuple[str, str, int], list[Run]]:
    """Runs grouped by ``(dataset, tag, seed)``, keys sorted, each group in (hparams, path) order."""
    groups: dict[tuple[str, str, int], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.dataset, run.tag, run.seed), []).append(run)
    return {k: sorted(groups[k], key=lambda r: (r.hparams, str(r.path))) for k in sorted(groups)}


def _source_split_candidates(runs: Sequence[Run], test_domain: str, split: str) -> Iterator[Choice]:
    """Every evaluation of the runs holding out ``test_domain`` alone, scored by the mean ``split`` score of its
    source domains (evaluations without that split for every source are skipped)."""
    for run in _single_test_runs(runs, test_domain):
        for rec in _by_step(run.records):
            if all(f"{run.metric}/{d}/{split}" in rec for d in run.sources):
                yield Choice(
                    val_score=sum(run.score(rec, d, split) for d in run.sources) / len(run.sources),
                    test_score=run.score(rec, test_domain, "in"),
                    step=rec["step"],
                    hparams=run.hparams,
                )


def _single_test_runs(runs: Sequence[Run], test_domain: str) -> list[Run]:
    """The runs whose only test domain is ``test_domain``, in hparams order (ties of the argmax go first)."""
    return sorted((r for r in runs if r.test_domains == (test_domain,)), key=lambda r: (r.hparams, str(r.path)))


def _by_step(records: list[dict]) -> list[dict]:
    """``records`` in step order (the argmax keeps the earliest of equal steps)."""
    return sorted(records, key=lambda r: r["step"])


def _argmax(candidates: Iterable[Choice]) -> Choice | None:
    """The first candidate with the highest validation score, or None when there is none."""
    best = None
    for choice in candidates:
        if best is None or choice.val_score > best.val_score:
            best = choice
    return best
