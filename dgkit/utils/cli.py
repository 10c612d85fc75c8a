"""Command-line helpers for scripts that take their own flags and Hydra overrides together."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(flags, overrides)``: everything after ``--`` is a Hydra override, and so is any ``key=value`` token
    that is not a flag or a flag's ``--flag=value`` form.

    This keeps a list-valued flag (``--methods erm dann``) from swallowing overrides that follow it.
    """
    argv = list(argv)
    tail: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, tail = argv[:cut], argv[cut + 1 :]
    flags = [a for a in argv if a.startswith("-") or "=" not in a]
    overrides = [a for a in argv if not a.startswith("-") and "=" in a]
    return flags, overrides + tail


def parse_with_overrides(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> tuple[argparse.Namespace, list[str]]:
    """Parse a script's own flags with ``parser`` and return them with the Hydra overrides
    (:func:`split_overrides`); ``argv`` defaults to the command line."""
    flags, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    return parser.parse_args(flags), overrides


PATH_KEYS = ("ckpt", "out", "data.root", "paths.datasets")


def quote_paths(argv: list[str]) -> list[str]:
    """Quote the values of path arguments for Hydra's override parser, so a run folder's path works as printed
    (run folders are named after their overrides: ``outputs/runs/+exp=quickstart/...`` holds ``=`` and ``+``)."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in PATH_KEYS and value and value[0] not in "'\"":
            value = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
        out.append(f"{key}{sep}{value}" if sep else arg)
    return out
