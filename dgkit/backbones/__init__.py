"""Backbones behind one surface: ``forward_features``, ``forward`` (pooled ``[B, D]``), ``num_features``,
``data_config``; and two declared capabilities: ``forward_intermediates`` (timm 1.0's surface, with
``feature_info``) and ``stages()`` (stem, stage modules and pool, for methods that act between stages; see
:mod:`dgkit.backbones.stages`). Built from ``conf/backbone/*.yaml`` by the composition root."""

from dgkit.backbones.base import Backbone, DataConfig, Stages, StagesNotSupported
from dgkit.backbones.sam import SAMBackbone
from dgkit.backbones.small_cnn import SmallCNN
from dgkit.backbones.timm_backbone import TimmBackbone

__all__ = ["Backbone", "DataConfig", "SAMBackbone", "SmallCNN", "Stages", "StagesNotSupported", "TimmBackbone"]
