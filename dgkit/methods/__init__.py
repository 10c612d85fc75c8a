"""Training objectives: the ``Method`` base (a LightningModule) and one file per objective."""

from dgkit.methods.base import Method
from dgkit.methods.erm import ERM

__all__ = ["ERM", "Method"]
