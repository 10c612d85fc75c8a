"""Train one domain-generalisation run: ``python train.py +exp=quickstart`` (see README.md)."""

import hydra
from omegaconf import DictConfig

from dgkit.config import register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; all the work is in ``dgkit.run.train``."""
    from dgkit.run import train

    train(cfg)


if __name__ == "__main__":
    main()
