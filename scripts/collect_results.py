"""Collect a sweep's runs into DomainBed-style tables, one per dataset and selection rule.

Usage::

    python scripts/collect_results.py DIR [--out OUTDIR] [--include-incomplete]

Reads every run directory below ``DIR`` (``run.json`` + ``results.jsonl`` + ``done``), prints the markdown
tables and writes ``results.md``, ``results.csv`` and ``<dataset>.png`` into ``OUTDIR`` (default ``DIR``).
Runs without the ``done`` marker are skipped unless ``--include-incomplete`` is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dgkit.eval import RecordsError, load_runs, split_finished, summarise, to_markdown, write_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="sweep directory (run directories at any depth)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: DIR)")
    parser.add_argument("--include-incomplete", action="store_true", help="also use runs without the 'done' marker")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the collection; return the exit status (0 on success, 1 on error)."""
    args = parse_args(argv)
    try:
        runs = load_runs(args.dir)
        if not runs:
            raise RecordsError(f"no runs found under {args.dir} (no run.json in it or below it)")
        finished, unfinished = split_finished(runs)
        if unfinished and not args.include_incomplete:
            print(
                f"note: skipped {len(unfinished)} unfinished run(s) without a 'done' marker "
                "(use --include-incomplete to keep them)",
                file=sys.stderr,
            )
            runs = finished
        if not runs:
            raise RecordsError(f"no finished runs under {args.dir}")
        summary = summarise(runs)
        print(to_markdown(summary))
        written = write_report(summary, args.out or args.dir)
    except (FileNotFoundError, RecordsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
