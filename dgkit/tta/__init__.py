"""Test-time adaptation: wrappers around a trained model, applied to test batches (``conf/tta/``)."""

from dgkit.tta.adanpc import AdaNPC, knn_scores
from dgkit.tta.base import RESET_POLICIES, NoAdaptation, TestTimeAdapter, entropy
from dgkit.tta.evaluate import evaluate_tta, load_checkpoint
from dgkit.tta.norm import BNAdapt, Tent
from dgkit.tta.t3a import T3A

__all__ = [
    "RESET_POLICIES", "AdaNPC", "BNAdapt", "NoAdaptation", "T3A", "Tent", "TestTimeAdapter", "entropy",
    "evaluate_tta", "knn_scores", "load_checkpoint",
]
