"""Plan a multirun before launching it: the number of jobs, which runs each selection rule needs (with the
command that adds leave-one-domain-out's pair runs), and the estimated CPU hours from a short probe run.

Usage::

    python scripts/plan_sweep.py +exp=digits_erm method=dann hparams_seed='range(0,8)' \\
        'data.test_domains=[ink],[photo],[font],[street]' seed=0,1,2 [--probe-steps 5]

The overrides are the ones ``python train.py -m`` would get; ``--probe-steps N`` trains the first job N steps
(in a temporary folder) to time it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dgkit.errors import run_reporting_user_errors  # noqa: E402
from dgkit.plan import describe, plan  # noqa: E402
from dgkit.utils.cli import parse_with_overrides  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Print the plan; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe-steps", type=int, default=0, help="time the first job over N steps (0: no probe)")
    parser.epilog = "The multirun's Hydra overrides (key=value) may follow anywhere, or after --."
    args, overrides = parse_with_overrides(parser, argv)
    result = run_reporting_user_errors(plan, overrides, args.probe_steps)
    print(describe(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
