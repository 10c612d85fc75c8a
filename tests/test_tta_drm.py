"""DRM: the training loss, the entropy-weighted ensemble and head selection against numpy, steering, errors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dgkit.methods import DRM, ERM
from dgkit.tta import DRMEnsemble


class _Features(nn.Module):
    num_features = 4

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return torch.tanh(self.fc(x))


def _drm() -> DRM:
    torch.manual_seed(0)
    return DRM(_Features(), num_classes=3, domains=["a", "b", "c"], test_domains=["c"]).eval()


def test_drm_loss_is_half_the_domain_and_shared_cross_entropies():
    m = _drm()
    g = torch.Generator().manual_seed(1)
    batch = {d: (torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)) for d in ("b", "a")}
    losses = m.training_losses(batch)
    expected = 0.0
    for d, (x, y) in batch.items():  # "b" comes first: its head is heads[1] (source order), not heads[0]
        z = m.backbone(x)
        head = m.heads[["a", "b"].index(d)]
        expected += 0.5 * (F.cross_entropy(head(z), y) + F.cross_entropy(m.classifier(z), y)).item() / 2
    assert losses["loss"].item() == pytest.approx(expected, rel=1e-6)


def test_drm_forward_is_the_lowest_mean_entropy_head():
    m = _drm()
    x = torch.randn(7, 6)
    with torch.no_grad():
        logits = [h(m.backbone(x)) for h in [*m.heads, m.classifier]]
        ent = [float(-(p.softmax(1) * p.log_softmax(1)).sum(1).mean()) for p in logits]
        assert torch.allclose(m(x), logits[int(np.argmin(ent))])


def _numpy_ensemble(logits: np.ndarray, gamma: float) -> np.ndarray:
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    h = -(p * np.log(p)).sum(-1)  # (H, B)
    if gamma == -1:
        return p[h.argmin(0), np.arange(p.shape[1])]
    w = h ** (-gamma)
    w /= w.sum(0, keepdims=True)
    return (w[..., None] * p).sum(0)


@pytest.mark.parametrize("gamma", [-1.0, 0.0, 1.0, 5.0])
def test_ensemble_matches_numpy(gamma):
    tta = DRMEnsemble(gamma=gamma).bind_method(_drm())
    logits = torch.randn(3, 8, 3, dtype=torch.float64) * 2
    np.testing.assert_allclose(tta.ensemble(logits).numpy(), _numpy_ensemble(logits.numpy(), gamma), rtol=1e-9)


def test_steering_updates_only_the_heads_and_reset_restores_them():
    m = _drm()
    tta = DRMEnsemble(steps=2, beta=0.0, reset="per_domain").bind_method(m)
    assert tta.needs_grad
    initial = {k: v.clone() for k, v in tta.classifier.state_dict().items()}
    backbone = {k: v.clone() for k, v in tta.backbone.state_dict().items()}
    with torch.enable_grad():
        tta.predict(torch.randn(16, 6))
    assert any(not torch.equal(v, initial[k]) for k, v in tta.classifier.state_dict().items())
    assert all(torch.equal(v, backbone[k]) for k, v in tta.backbone.state_dict().items())
    assert all(p.grad is None for p in m.parameters())  # the source model is untouched
    tta.reset()
    assert all(torch.equal(v, initial[k]) for k, v in tta.classifier.state_dict().items())


def test_drm_tta_on_a_checkpoint_without_domain_heads_fails_early():
    erm = ERM(_Features(), num_classes=3, domains=["a", "b", "c"], test_domains=["c"])
    with pytest.raises(ValueError, match="method=drm"):
        DRMEnsemble().bind_method(erm)
    with pytest.raises(ValueError, match="gamma"):
        DRMEnsemble(gamma=-2)
