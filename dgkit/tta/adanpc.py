"""AdaNPC (Zhang et al., ICML 2023): non-parametric test-time classification by a k-NN vote over a memory of
source features with their true labels, growing with confident test samples.

Hand-written: the official ``yfzhang114/AdaNPC`` is DomainBed scripts, and a k-NN over a few thousand rows is
one matmul + ``topk`` (FAISS would be a heavy dependency for no gain at this size). Differences from the
official code (``../shared/methods/dg_objectives_and_tta.md`` §4.3): the memory starts empty (no stray row
labelled 0), confidence is ``max(scores)`` (the official softmax over [0, 1] scores caps it near e/(e+C-1), so
β ∈ {0.75, 1.1} meant "never"), and ``max_test_entries`` evicts the oldest *test* rows only.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from dgkit.tta.base import TestTimeAdapter


def knn_scores(
    queries: torch.Tensor,
    memory: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    k: int,
    tau: float,
    chunk: int = 1024,
) -> torch.Tensor:
    """AdaNPC's vote: for each L2-normalised query, ``score_c = Σ_{j ∈ top-k, y_j = c} softmax(s_topk / τ)_j``
    with cosine similarities ``s`` to the (normalised) memory rows, then ``clamp(score + 1e-5, max=1)``.

    Args:
        queries: ``(B, D)`` normalised features.
        memory: ``(M, D)`` normalised features; labels ``(M,)`` int64.
        num_classes: C; k: neighbours (capped at M); tau: softmax temperature.
        chunk: queries per matmul (bounds the ``chunk × M`` similarity block).
    """
    k = min(k, memory.shape[0])
    out = []
    for start in range(0, queries.shape[0], chunk):
        sims = queries[start : start + chunk] @ memory.T  # (b, M)
        top, idx = sims.topk(k, dim=1)  # (b, k)
        weights = (top / tau).softmax(dim=1)
        scores = torch.zeros(len(top), num_classes, device=queries.device, dtype=weights.dtype)
        scores.scatter_add_(1, labels[idx], weights)
        out.append((scores + 1e-5).clamp(max=1.0))
    return torch.cat(out)


class AdaNPC(TestTimeAdapter):
    """``tta=adanpc``: predict by the k-NN vote over the memory; append confident test samples.

    Args:
        k: neighbours (official default 100). tau: temperature (0.1). beta: confidence threshold on
            ``max(scores)`` (0.1); samples at or above it join the memory with their predicted label.
        max_test_entries: cap on test rows in the memory (FIFO eviction of test rows; ``None``: no cap).
        chunk: queries per similarity block.
        reset, batch_size: see :class:`~dgkit.tta.base.TestTimeAdapter`.
    """

    name = "adanpc"
    per_image_mechanism = "its k-NN memory holds pooled per-image features with one label per image"

    def __init__(
        self,
        k: int = 100,
        tau: float = 0.1,
        beta: float = 0.1,
        max_test_entries: int | None = None,
        chunk: int = 1024,
        reset: str = "per_domain",
        batch_size: int = 64,
    ) -> None:
        super().__init__(reset, batch_size)
        if k < 1 or tau <= 0:
            raise ValueError(f"tta.k={k} must be >= 1 and tta.tau={tau} > 0")
        if max_test_entries is not None and max_test_entries < 0:
            raise ValueError(f"tta.max_test_entries={max_test_entries} must be >= 0 (or null: no cap)")
        self.k, self.tau, self.beta = int(k), float(tau), float(beta)
        self.max_test_entries, self.chunk = max_test_entries, int(chunk)

    def setup(self, source: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The source memory: normalised features and true labels of every labelled source batch given."""
        self.num_classes = self.classifier.out_features if hasattr(self.classifier, "out_features") else None
        feats, labels = [], []
        with torch.no_grad():
            for x, y in source:
                feats.append(self.backbone(x.to(self.device)))
                labels.append(y.to(self.device))
        if not feats:
            raise ValueError("tta=adanpc needs the source domains' labelled images to build its memory; none given")
        self.load_source(torch.cat(feats), torch.cat(labels))

    def load_source(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Replace the memory by ``features (M, D)`` (L2-normalised here) with true ``labels (M,)``, no test rows.

        :meth:`setup` calls it with the source features; benchmarks call it with a memory of a chosen size.
        """
        self.source_memory = F.normalize(features.to(self.device), dim=1)
        self.source_labels = labels.to(self.device).long()
        if self.num_classes is None:
            self.num_classes = int(self.source_labels.max()) + 1
        self.test_memory = self.source_memory.new_zeros((0, self.source_memory.shape[1]))
        self.test_labels = self.source_labels.new_zeros((0,))

    def state(self) -> dict:
        """The test rows (the source rows never change)."""
        return {"test_memory": self.test_memory, "test_labels": self.test_labels}

    def load_state(self, state: dict) -> None:
        """Restore the test rows."""
        self.test_memory, self.test_labels = state["test_memory"], state["test_labels"]

    @property
    def memory(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All rows: source first, then test rows in arrival order."""
        if len(self.test_labels) == 0:  # no copy of the source rows while no test row was accepted
            return self.source_memory, self.source_labels
        return torch.cat([self.source_memory, self.test_memory]), torch.cat([self.source_labels, self.test_labels])

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Vote, then append the confident samples (``max(scores) >= beta``); returns log-scores."""
        z = F.normalize(self.backbone(x), dim=1)
        memory, labels = self.memory
        scores = knn_scores(z, memory, labels, self.num_classes, self.k, self.tau, self.chunk)
        confidence, predicted = scores.max(dim=1)
        keep = confidence >= self.beta
        if keep.any() and self.max_test_entries != 0:
            self.test_memory = torch.cat([self.test_memory, z[keep].detach()])
            self.test_labels = torch.cat([self.test_labels, predicted[keep]])
            if self.max_test_entries is not None and len(self.test_labels) > self.max_test_entries:
                self.test_memory = self.test_memory[-self.max_test_entries :]
                self.test_labels = self.test_labels[-self.max_test_entries :]
        return scores.log()
