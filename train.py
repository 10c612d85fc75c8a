"""Train one domain-generalisation run: ``python train.py +exp=quickstart`` (see README.md)."""

import hydra
from omegaconf import DictConfig

from dgkit.config import register_resolvers
from dgkit.errors import run_reporting_user_errors
from dgkit.utils.allocator import tune_allocator

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; all the work is in ``dgkit.run.train``. Bad input ends in one message, exit status 2.

    Returns the run's training-domain validation score (``final.json``'s ``val_score``, never a held-out domain's):
    the value a sweeper that optimises (``hydra/sweeper=optuna_source_val``) maximises. ``None`` on a DDP rank > 0.
    """
    from dgkit.run import train  # noqa: PLC0415 (after Hydra parsed the command line: --help stays fast)

    return run_reporting_user_errors(train, cfg).get("val_score")


if __name__ == "__main__":
    tune_allocator()  # glibc: reuse freed activation buffers across steps (DGKIT_MALLOC=default: off)
    main()
