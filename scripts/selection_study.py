"""Compare selection rules on a sweep: per held-out fold, the rank correlation between each rule's validation
score and the held-out score over every candidate evaluation, and the regret of its choice (best held-out
score minus the chosen one).

Usage::

    python scripts/selection_study.py outputs/sweeps/crafted_digits [--out docs/results/crafted_digits]

All four rules of :data:`dgkit.eval.selection.RULES`. Needs runs with several hyper-parameter candidates
(``hparams_seed=0,1,...``); the crafted-shift rule needs ``+validation=crafted``, leave-one-domain-out the pair
runs ``scripts/plan_sweep.py`` prints (a rule without its runs shows ``-``). With ``--out``, writes
``selection.md`` and a scatter per (dataset, tag, seed): every rule's validation score against held-out accuracy.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dgkit.eval import group_runs, load_runs, split_finished  # noqa: E402
from dgkit.eval.selection import RULES  # noqa: E402
from dgkit.eval.study import rule_quality, rule_scatter  # noqa: E402
from dgkit.eval.tables import safe_file_name  # noqa: E402
from dgkit.utils.io import atomic_write, atomic_write_text  # noqa: E402


def report(folder: Path, plots: Path | None = None) -> str:
    """The study's markdown for every (dataset, tag, seed) group of the finished runs under ``folder``; with
    ``plots``, also each group's :func:`~dgkit.eval.study.rule_scatter` as ``selection_<dataset>_<tag>_s<seed>.png``
    there."""
    finished, _ = split_finished(load_runs(folder))
    lines = []
    for (dataset, tag, seed), runs in group_runs(finished).items():
        folds = [d for d in runs[0].domains if any(r.test_domains == (d,) for r in runs)]
        if plots is not None:
            fig = rule_scatter(RULES, runs, folds, title=f"{dataset}, {tag}, seed {seed}")
            name = safe_file_name(f"selection_{dataset}_{tag}_s{seed}")
            png = atomic_write(
                plots / f"{name}.png", lambda f, fig=fig: fig.savefig(f, format="png", dpi=110), binary=True
            )
            print(f"wrote {png}", file=sys.stderr)
        candidates = {t: len({r.hparams for r in runs if r.test_domains == (t,)}) for t in folds}
        lines += [f"### {dataset}, {tag}, seed {seed}", "", "| held-out | candidates | " + " | ".join(
            f"{r.name}: ρ / regret" for r in RULES) + " |", "|---" * (2 + len(RULES)) + "|"]  # fmt: skip
        sums = {r.name: [] for r in RULES}
        for t in folds:
            cells = []
            for rule in RULES:
                q = rule_quality(rule, runs, t)
                if q is None:
                    cells.append("-")
                    continue
                sums[rule.name].append(q)
                rho = "n/a" if math.isnan(q.spearman) else f"{q.spearman:+.2f}"
                cells.append(f"{rho} / {100 * q.regret:.1f}")
            lines.append(f"| {t} | {candidates[t]} | " + " | ".join(cells) + " |")
        means = []
        for rule in RULES:
            qs = sums[rule.name]
            rhos = [q.spearman for q in qs if not math.isnan(q.spearman)]
            means.append(
                f"{sum(rhos) / len(rhos):+.2f} / {100 * sum(q.regret for q in qs) / len(qs):.1f}" if qs else "-"
            )
        lines += ["| mean | | " + " | ".join(means) + " |", ""]
    legend = ("ρ: Spearman rank correlation between the rule's validation score and the held-out `in` score over "
              "every evaluation it scores; regret: best held-out score among all evaluations minus the chosen one "
              "(points, ×100); `-`: the rule's runs are missing (leave-one-domain-out needs the pair runs, "
              "crafted-shift validation `+validation=crafted`).")  # fmt: skip
    return "\n".join(["# Selection rules compared", "", legend, "", *lines])


def main(argv: list[str] | None = None) -> int:
    """Print the study (and write it with ``--out``); return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    text = report(args.folder, plots=args.out)
    print(text)
    if args.out:
        print(f"wrote {atomic_write_text(args.out / 'selection.md', text + chr(10))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
