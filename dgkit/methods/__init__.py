"""Training objectives: the ``Method`` base (a LightningModule) and one file per objective."""

from dgkit.methods.base import Method
from dgkit.methods.dann import DANN
from dgkit.methods.drm import DRM
from dgkit.methods.erm import ERM
from dgkit.methods.itta import ITTA
from dgkit.methods.linear_probe import LinearProbe
from dgkit.methods.mapsam import MapSAM
from dgkit.methods.sam_pretrain import SAMPretrain
from dgkit.methods.sharpness import Sharpness
from dgkit.methods.simclr import SimCLR
from dgkit.methods.udim import UDIM

__all__ = [
    "DANN",
    "DRM",
    "ERM",
    "ITTA",
    "LinearProbe",
    "MapSAM",
    "Method",
    "SAMPretrain",
    "Sharpness",
    "SimCLR",
    "UDIM",
]
