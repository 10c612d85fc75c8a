"""Backbones behind one surface: ``forward_features``, ``forward`` (pooled ``[B, D]``), ``num_features``,
``data_config``. Built from ``conf/backbone/*.yaml`` by the composition root."""

from dgkit.backbones.base import Backbone, DataConfig
from dgkit.backbones.small_cnn import SmallCNN
from dgkit.backbones.timm_backbone import TimmBackbone

__all__ = ["Backbone", "DataConfig", "SmallCNN", "TimmBackbone"]
