"""Export of trained models to files other tools read: backbone weights (``backbone.safetensors``) and runtime
artifacts (``scripts/export.py``: ONNX Runtime or ``torch.export`` folders with a manifest and parity checks; opened
by :func:`dgkit.export.runtime.load_export`)."""

from dgkit.export.backbone import export_backbone

__all__ = ["export_backbone"]
