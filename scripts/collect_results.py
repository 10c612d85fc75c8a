"""Collect a sweep's runs into DomainBed-style tables, one per dataset and selection rule.

Usage::

    python scripts/collect_results.py DIR [DIR ...] [--out OUTDIR] [--include-incomplete]

Reads every run directory below each ``DIR`` (``run.json`` + ``results.jsonl`` + ``done``), prints the markdown
tables and writes ``results.md``, ``results.csv`` and ``<dataset>.png`` into ``OUTDIR`` (default: the one
``DIR``; required with several). Several sweep folders give one table with a row per ``tag`` (e.g. ERM, DANN
and SAM side by side); runs sharing a tag are hyper-parameter candidates that the selection rules choose from.
Runs without the ``done`` marker are skipped unless ``--include-incomplete`` is given. A row whose runs record
different algorithm choices in ``run.json`` (e.g. ERM and ERM+BSS under one ``tag=``) gets a warning on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dgkit.eval import RecordsError, dataset_metrics, load_runs, split_finished, summarise, to_markdown, write_report
from dgkit.eval.mixed import mixed_rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", type=Path, nargs="+", metavar="DIR", help="sweep directories (runs at any depth)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: DIR; required with several)")
    parser.add_argument("--include-incomplete", action="store_true", help="also use runs without the 'done' marker")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the collection; return the exit status (0 on success, 1 on error)."""
    args = parse_args(argv)
    if args.out is None and len(args.dirs) > 1:
        print("error: --out is required with several sweep directories", file=sys.stderr)
        return 1
    try:
        runs = []
        for folder in args.dirs:
            found = load_runs(folder)
            if not found:
                raise RecordsError(f"no runs found under {folder} (no run.json in it or below it)")
            runs += found
        finished, unfinished = split_finished(runs)
        if unfinished and not args.include_incomplete:
            print(
                f"note: skipped {len(unfinished)} unfinished run(s) without a 'done' marker "
                "(use --include-incomplete to keep them)",
                file=sys.stderr,
            )
            runs = finished
        if not runs:
            raise RecordsError(f"no finished runs under {', '.join(map(str, args.dirs))}")
        for warning in mixed_rows(runs):  # a row mixing algorithms still gets a table, with this caveat
            print(f"warning: {warning}", file=sys.stderr)
        summary = summarise(runs)
        metrics = dataset_metrics(runs)
        print(to_markdown(summary, metrics=metrics))
        written = write_report(summary, args.out or args.dirs[0], metrics=metrics)
    except (FileNotFoundError, RecordsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
