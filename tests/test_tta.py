"""Test-time adaptation: each method against a hand or numpy computation, resets, and the evaluation entry point."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from dgkit.checkpoint import load_checkpoint_and_data
from dgkit.run import train
from dgkit.search import without_search
from dgkit.tta import T3A, AdaNPC, BNAdapt, Tent, build_test_sets, entropy, evaluate_tta, knn_scores
from dgkit.tta.evaluate import source_batches, stream
from tests.conftest import CONF, ROOT


class Flatten(nn.Module):
    """A backbone stand-in: identity on ``(B, D)`` features, with ``num_features``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.num_features = d
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * self.scale


def bn_backbone() -> nn.Module:
    """A tiny conv + BatchNorm + GroupNorm backbone giving 4 features."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.GroupNorm(2, 4),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )  # fmt: skip


def test_knn_vote_matches_a_hand_computation_on_six_rows():
    memory = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0], [0.6, -0.8], [0.0, -1.0]])
    labels = torch.tensor([0, 1, 1, 2, 0, 2])
    q = torch.tensor([[1.0, 0.0]])
    # cosine similarities 1, 0.8, 0, -1, 0.6, 0; top-3 = rows 0 (1.0), 1 (0.8), 4 (0.6)
    tau = 0.5
    w = np.exp(np.array([1.0, 0.8, 0.6]) / tau)
    w /= w.sum()
    expected = np.array([w[0] + w[2], w[1], 0.0]) + 1e-5
    got = knn_scores(q, memory, labels, num_classes=3, k=3, tau=tau)
    np.testing.assert_allclose(got[0].numpy(), np.minimum(expected, 1.0), rtol=1e-6)
    # k larger than the memory uses every row; chunking does not change the result
    many = torch.nn.functional.normalize(torch.randn(10, 2), dim=1)
    chunked = knn_scores(many, memory, labels, 3, 50, 0.1, chunk=3)
    assert torch.allclose(chunked, knn_scores(many, memory, labels, 3, 6, 0.1))


def _adanpc(beta: float, max_test: int | None = None, tau: float = 1.0) -> AdaNPC:
    source = [(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]]), torch.tensor([0, 1, 0]))]
    return AdaNPC(k=2, tau=1.0, beta=beta, max_test_entries=max_test).bind(Flatten(2), nn.Linear(2, 2), source)


def test_adanpc_adds_confident_samples_and_reset_restores_the_source_memory():
    tta = _adanpc(beta=0.9)
    source = tta.memory[0].clone()
    assert torch.allclose(source, torch.nn.functional.normalize(torch.tensor([[1.0, 0], [0, 1], [0.9, 0.1]]), dim=1))
    # first: both neighbours are class 0 (score 1); second: neighbours of class 1 (s=0.995) and 0 (s=0.209),
    # so its best score is softmax([0.995, 0.209])[0] = 0.687 < beta
    x = torch.tensor([[2.0, 0.0], [0.1, 1.0]])
    scores = tta.predict(x).exp()
    assert scores[0].argmax() == 0 and scores[0].max() > 0.99
    assert scores[1].argmax() == 1 and scores[1].max() == pytest.approx(0.687, abs=2e-3)
    memory, labels = tta.memory
    assert len(labels) == 4 and labels[-1] == 0
    assert torch.allclose(memory[-1], torch.tensor([1.0, 0.0]))
    tta.reset()
    memory, labels = tta.memory
    assert torch.equal(memory, source) and labels.tolist() == [0, 1, 0]


def test_adanpc_evicts_the_oldest_test_rows_only():
    tta = _adanpc(beta=0.0, max_test=2)
    for i in range(3):
        tta.predict(torch.tensor([[1.0, 0.01 * (i + 1)]]))
    memory, labels = tta.memory
    assert len(labels) == 5  # 3 source rows kept + the 2 newest test rows
    assert torch.allclose(memory[3:, 1] / memory[3:, 0], torch.tensor([0.02, 0.03]))


def test_tent_updates_only_norm_affine_and_lowers_the_batch_entropy():
    backbone, head = bn_backbone(), nn.Linear(4, 3)
    tta = Tent(optimizer=lambda p: torch.optim.SGD(p, lr=1.0), reset="never").bind(backbone, head)
    before = {k: v.clone() for k, v in tta.backbone.state_dict().items()}
    head_before = {k: v.clone() for k, v in tta.classifier.state_dict().items()}
    x = torch.randn(16, 3, 8, 8)
    h0 = entropy(tta.classifier(tta.backbone(x))).mean().item()
    with torch.enable_grad():
        tta.predict(x)
    h1 = entropy(tta.classifier(tta.backbone(x))).mean().item()
    assert h1 < h0
    changed = {k for k, v in tta.backbone.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"1.weight", "1.bias"}  # BatchNorm affine only (GroupNorm is left when BatchNorm exists)
    assert all(torch.equal(v, head_before[k]) for k, v in tta.classifier.state_dict().items())
    assert all(p.grad is None for p in backbone.parameters())  # the source model is untouched


def test_tent_uses_layernorm_affine_without_batchnorm():
    backbone = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    tta = Tent().bind(backbone, nn.Linear(4, 2))
    assert tta.adapted == ["1.weight", "1.bias"]


def test_episodic_reset_restores_the_exact_initial_state():
    tta = Tent(optimizer=lambda p: torch.optim.Adam(p, lr=0.1), reset="per_batch").bind(bn_backbone(), nn.Linear(4, 3))
    initial = {k: v.clone() for k, v in tta.backbone.state_dict().items()}
    with torch.enable_grad():
        tta.predict(torch.randn(8, 3, 8, 8))
    assert not all(torch.equal(v, initial[k]) for k, v in tta.backbone.state_dict().items())
    tta.reset()
    assert all(torch.equal(v, initial[k]) for k, v in tta.backbone.state_dict().items())
    assert tta.optimizer.state_dict()["state"] == {}


def test_bn_adapt_normalises_with_batch_statistics():
    backbone = bn_backbone().eval()
    backbone[1].running_mean.fill_(5.0)  # source statistics far from the batch's
    tta = BNAdapt().bind(backbone, nn.Linear(4, 2))
    x = torch.randn(8, 3, 8, 8)
    conv = tta.backbone[0](x)
    normed = tta.backbone[1](conv)
    mean = conv.mean(dim=(0, 2, 3), keepdim=True)
    var = conv.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    bn = tta.backbone[1]
    expected = (conv - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    assert torch.allclose(normed, expected, atol=1e-5)


def test_tta_needing_batchnorm_fails_early_on_a_backbone_without_it():
    with pytest.raises(ValueError, match="needs BatchNorm"):
        BNAdapt().bind(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="normalisation layers"):
        Tent().bind(nn.Linear(4, 4), nn.Linear(4, 2))


def test_t3a_templates_are_normalised_support_means():
    head = nn.Linear(3, 2)
    tta = T3A(filter_k=-1).bind(Flatten(3), head)
    x = torch.randn(20, 3)
    logits = tta.predict(x)
    with torch.no_grad():
        w = head.weight.numpy().astype(np.float64)
        supports = np.concatenate([w, x.numpy()])
        labels = np.concatenate([head(head.weight).argmax(1).numpy(), head(x).argmax(1).numpy()])
    unit = supports / np.linalg.norm(supports, axis=1, keepdims=True)
    for c in range(2):
        mean = unit[labels == c].mean(axis=0)
        np.testing.assert_allclose(tta.templates()[:, c].detach().numpy(), mean / np.linalg.norm(mean), atol=1e-5)
    assert len(tta.supports) == 22  # -1 keeps every support
    np.testing.assert_allclose(logits.detach().numpy(), x.numpy() @ tta.templates().detach().numpy(), atol=1e-5)


def test_t3a_keeps_the_lowest_entropy_supports_per_class():
    tta = T3A(filter_k=1).bind(Flatten(2), nn.Linear(2, 2))
    tta.predict(torch.randn(10, 2) * 5)
    assert len(tta.supports) <= 2
    assert sorted(tta.labels.argmax(1).tolist()) == sorted(set(tta.labels.argmax(1).tolist()))


def test_empty_test_domain_is_an_error():
    with pytest.raises(ValueError, match="empty domain is not 0 %"):
        stream(torch.utils.data.TensorDataset(torch.zeros(0, 3)), 8, 0)


def test_every_tta_config_builds():
    for path in sorted((CONF / "tta").glob("*.yaml")):
        tta = instantiate(without_search(OmegaConf.load(path)))  # the search block is not an argument
        assert tta.name == path.stem and tta.reset_policy == "per_domain"


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """A few steps of ERM with the small CNN on the synthetic benchmark; its best checkpoint."""
    from tests.conftest import TINY, compose_cfg

    out = tmp_path_factory.mktemp("tta_run") / "run"
    overrides = [o for o in TINY if not o.startswith("backbone=")] + ["backbone=small_cnn_lite"]
    train(compose_cfg(overrides, out))
    return out / "checkpoints" / "best.ckpt"


def test_gradient_tta_under_the_evaluation_entry_point(trained_checkpoint):
    cfg, datamodule, method = load_checkpoint_and_data(trained_checkpoint)
    result = evaluate_tta(method, datamodule, Tent(batch_size=8), seed=0)
    c = result["sets"]["c"]
    images = datamodule.split("c", "in")
    assert c["images"] == len(images) and result["needs_grad"] and result["batch_size"] == 8
    # the no-TTA accuracy is the trained model's own, measured independently here
    x = torch.stack([images[i][0] for i in range(len(images))])
    y = torch.tensor([images[i][1] for i in range(len(images))])
    with torch.no_grad():
        assert c["acc_none"] == pytest.approx((method(x).argmax(1) == y).float().mean().item())
        # the TTA's accuracy is Tent's own over the same seeded stream, replayed here by hand
        tent = Tent(batch_size=8).bind_method(method)
        correct = 0
        for xb, yb in stream(images, 8, 0):
            with torch.enable_grad():
                correct += int((tent.predict(xb).argmax(1) == yb).sum())
    assert c["acc_tta"] == pytest.approx(correct / len(images))
    assert all(p.grad is None for p in method.parameters())  # the source model is untouched
    with pytest.raises(ValueError, match="unknown test domain"):
        build_test_sets(datamodule, ["zzz"])


def test_source_validation_keeps_the_evaluated_split_out_of_the_memory(trained_checkpoint):
    _, datamodule, _ = load_checkpoint_and_data(trained_checkpoint)
    every = len(source_batches(datamodule).dataset)
    without = len(source_batches(datamodule, exclude=[("a", "out")]).dataset)
    assert every - without == len(datamodule.splits[("a", "out")]) > 0


def test_empty_held_out_split_is_an_error(trained_checkpoint):
    _, datamodule, _ = load_checkpoint_and_data(trained_checkpoint)
    datamodule.splits[("c", "in")] = datamodule.splits[("c", "in")][:0]
    with pytest.raises(ValueError, match="no images"):
        build_test_sets(datamodule, ["c"])


def test_evaluate_script_writes_its_result(trained_checkpoint, tmp_path):
    out = tmp_path / "adanpc.json"
    args = [f"ckpt='{trained_checkpoint}'", "tta=adanpc", "tta.k=5", f"out='{out}'", "threads=1"]
    cmd = [sys.executable, "scripts/evaluate.py", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["tta"] == "adanpc" and set(result["sets"]) == {"c"} and result["tta_config"]["k"] == 5
    assert "tta=adanpc" in proc.stdout


def test_train_with_tta_evaluates_the_selected_checkpoint(tiny_cfg, tmp_path):
    final = train(tiny_cfg("method=drm", "backbone=small_cnn_lite", "tta=drm", "tta.steps=1", "tta.beta=0.0"))
    entry = final["tta"]["drm"]
    assert set(entry["sets"]) == {"c"} and entry["batch_size"] == 64
    saved = json.loads((tmp_path / "run" / "final.json").read_text())
    assert saved["tta"]["drm"]["sets"] == entry["sets"]
    result = json.loads(open(entry["file"]).read())
    assert result["needs_grad"] and result["tta_config"]["steps"] == 1
