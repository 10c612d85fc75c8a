"""Export of trained models to files other tools read: backbone weights today (``backbone.safetensors``);
runtime artifacts (ONNX) join here."""

from dgkit.export.backbone import export_backbone

__all__ = ["export_backbone"]
