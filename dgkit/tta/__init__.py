"""Test-time adaptation: wrappers around a trained model, applied to test batches (``conf/tta/``)."""

from dgkit.tta.adanpc import AdaNPC, knn_scores
from dgkit.tta.base import RESET_POLICIES, NoAdaptation, TestTimeAdapter, entropy
from dgkit.tta.drm import DRMEnsemble
from dgkit.tta.evaluate import build_test_sets, evaluate_tta
from dgkit.tta.itta import ITTAAdapter
from dgkit.tta.norm import BNAdapt, Tent
from dgkit.tta.t3a import T3A

__all__ = [
    "RESET_POLICIES",
    "T3A",
    "AdaNPC",
    "BNAdapt",
    "DRMEnsemble",
    "ITTAAdapter",
    "NoAdaptation",
    "Tent",
    "TestTimeAdapter",
    "entropy",
    "evaluate_tta",
    "knn_scores",
    "build_test_sets",
]
