"""Pruning links (dgkit.compress.prune, dgkit.compress.structured): every score checked against an independent
computation, masks and structures against what the config asks for, replay against a fresh model."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from dgkit.chain import TransformContext, replay_chain
from dgkit.compose import build
from dgkit.compress.prune import UnstructuredPrune, obs_saliency
from dgkit.compress.structured import StructuredPrune
from dgkit.tasks import Classification

AFTER_FIT = "after_fit"


# ---- tiny models and data ------------------------------------------------------------------------------------
class Toy(nn.Module):
    """A method's surface (backbone, classifier, task) around hand-sized layers."""

    def __init__(self, backbone: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.backbone, self.classifier, self.task = backbone, classifier, Classification()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x))


def conv_toy() -> Toy:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(6, 5))  # fmt: skip
    return Toy(backbone, nn.Linear(5, 3))


class HeldOut(Dataset):
    """A held-out domain's data: any access fails the test."""

    def __len__(self) -> int:
        raise AssertionError("a held-out domain was read")

    def __getitem__(self, i: int):
        raise AssertionError("a held-out domain was read")


class FakeData:
    """The part of a DGDataModule that calibration reads; the held-out domain raises on access."""

    def __init__(self, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.data = data
        self.source_domains, self.test_domains = list(data), ["held"]

    def split(self, domain: str, split: str, train: bool = False) -> Dataset:
        return HeldOut() if domain in self.test_domains else TensorDataset(*self.data[domain])


def image_data(domains: str = "ab", n: int = 6) -> FakeData:
    g = torch.Generator().manual_seed(1)
    return FakeData({d: (torch.randn(n, 3, 5, 5, generator=g) * (i + 1), torch.arange(n) % 3)
                     for i, d in enumerate(domains)})  # fmt: skip


def tiny_method(tiny_cfg, *overrides: str):
    cfg = tiny_cfg(*overrides)
    datamodule, method = build(cfg)
    return cfg, datamodule, method.eval()


def weights_only_roundtrip(state: dict) -> dict:
    """The state as a checkpoint gives it back (``torch.load(weights_only=True)``)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ---- unstructured ---------------------------------------------------------------------------------------------
def test_magnitude_prunes_the_smallest_weights_of_each_layer(one_thread):
    model = conv_toy()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = UnstructuredPrune(importance="magnitude", sparsity=0.4).transform(model, TransformContext(AFTER_FIT))
    assert state["report"]["layers"] == ["backbone.0", "backbone.4"]
    for name in state["report"]["layers"]:
        w0, w = before[f"{name}.weight"].flatten(), model.get_submodule(name).weight.detach().flatten()
        k = round(0.4 * w0.numel())
        smallest = torch.sort(w0.abs()).indices[:k]
        assert torch.all(w[smallest] == 0)
        kept = torch.ones_like(w0, dtype=torch.bool)
        kept[smallest] = False
        assert torch.equal(w[kept], w0[kept])
        assert state["layers"][name] == pytest.approx(k / w0.numel())
    assert torch.equal(model.classifier.weight, before["classifier.weight"])  # the head is excluded by default
    sizes = [model.get_submodule(n).weight.numel() for n in state["report"]["layers"]]
    zeros = sum(round(0.4 * s) for s in sizes)
    assert state["report"]["overall_sparsity"] == pytest.approx(zeros / sum(sizes))
    assert state["calibration"] is None


def test_wanda_score_is_weight_magnitude_times_input_norm(one_thread):
    torch.manual_seed(0)
    model = Toy(nn.Sequential(nn.Linear(6, 4)), nn.Linear(4, 3))
    g = torch.Generator().manual_seed(2)
    x = {d: torch.randn(10, 6, generator=g) * torch.linspace(0.2, s, 6) for d, s in (("a", 1.0), ("b", 5.0))}
    data = FakeData({d: (v, torch.arange(10) % 3) for d, v in x.items()})
    link = UnstructuredPrune(importance="wanda", sparsity=0.5, combine="mean")
    w = model.backbone[0].weight.detach().clone()
    per_domain = {d: w.abs() * v.square().sum(0).sqrt()[None, :] for d, v in x.items()}  # |W_ij|·||x_j||
    expected = sum(s / s.mean() for s in per_domain.values()) / 2
    calibration = link.calibrate(TransformContext(AFTER_FIT, data))
    scores = link.scores(model, ["backbone.0"], calibration)["backbone.0"]
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    state = link.transform(model, TransformContext(AFTER_FIT, data))
    pruned = torch.sort(expected.flatten()).indices[:12]
    assert torch.all(model.backbone[0].weight.flatten()[pruned] == 0)
    assert state["calibration"] == {"domains": ["a", "b"], "counts": {"a": 10, "b": 10}, "allow_target": False}
    assert state["report"]["combine"] == "mean"


def _obs_reference(w: np.ndarray, h: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """SparseGPT's saliency in float64 numpy: W² / U_jj², H⁻¹ = UᵀU (U upper, so U_jj = L_jj of H⁻¹ = L Lᵀ)."""
    hd = h + damp * np.mean(np.diag(h)) * np.eye(len(h))
    lower = np.linalg.cholesky(np.linalg.inv(hd))
    return w**2 / np.diag(lower)[None, :] ** 2


def test_obs_saliency_matches_a_float64_reference():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20, 5, generator=g) * torch.tensor([1.0, 3.0, 0.5, 2.0, 1.0])
    x[:, 4] += 0.8 * x[:, 1]  # correlated inputs: the Cholesky factor is not diagonal
    h = 2 * x.T @ x / len(x)
    w = torch.randn(3, 5, generator=g)
    expected = _obs_reference(w.double().numpy(), h.double().numpy())
    np.testing.assert_allclose(obs_saliency(w, h).numpy(), expected, rtol=1e-5)
    h_dead = h.clone()
    h_dead[2, :], h_dead[:, 2] = 0, 0  # an input that is always zero: its weights never act
    assert torch.all(obs_saliency(w, h_dead)[:, 2] == 0)


def _one_domain_toy() -> Toy:
    """Equal weights and a classifier whose rows give every hidden unit the same loss gradient, so a weight's
    domain score is set by its input channel alone."""
    model = Toy(nn.Sequential(nn.Linear(4, 4, bias=False)), nn.Linear(4, 2))
    with torch.no_grad():
        model.backbone[0].weight.fill_(0.1)
        model.classifier.weight.copy_(torch.tensor([[0.5] * 4, [-0.5] * 4]))
        model.classifier.bias.zero_()
    return model


@pytest.mark.parametrize("combine", ["min", "mean"])
def test_dpruner_min_keeps_a_weight_only_one_domain_needs(combine, one_thread):
    # input channel 0 carries signal in domain a only; a, b, c are sources
    x = {"a": torch.tensor([[3.67, 1.0, 1.0, 1.0]]), "b": torch.tensor([[0.0, 1.0, 1.0, 1.0]])}
    x["c"] = x["b"].clone()
    data = FakeData({d: (v, torch.zeros(1, dtype=torch.long)) for d, v in x.items()})
    model = _one_domain_toy()
    link = UnstructuredPrune(importance="dpruner", sparsity=0.25, combine=combine, general_weight=0.0)
    link.transform(model, TransformContext(AFTER_FIT, data))
    column0 = model.backbone[0].weight[:, 0]
    if combine == "min":  # normalised scores: 2.3 in domain a against at most 1.33 for the others: kept
        assert torch.all(column0 != 0)
    else:  # averaged over three domains: 0.75 against 1.09: exactly that column goes
        assert torch.all(column0 == 0) and torch.all(model.backbone[0].weight[:, 1:] != 0)


def test_dpruner_scores_match_an_independent_computation(one_thread):
    model, data = conv_toy(), image_data()
    link = UnstructuredPrune(importance="dpruner", combine="mean", general_weight=0.5)
    calibration = link.calibrate(TransformContext(AFTER_FIT, data))
    names = ["backbone.0", "backbone.4"]
    scores = link.scores(model, names, calibration)
    conv, linear = model.backbone[0], model.backbone[4]
    # general: H from every source input row (the conv's unfolded 3x3 patches), float64 OBS saliency
    x_all = torch.cat([x for x, _ in data.data.values()])
    rows = {
        "backbone.0": F.unfold(x_all, 3, padding=1).transpose(1, 2).reshape(-1, 27),
        "backbone.4": model.backbone[:4](x_all).detach(),
    }
    # domain: |g·w| + (g·w)²/2 from each domain's mean cross-entropy, each normalised by its mean, averaged
    domain = {n: [] for n in names}
    for x, y in data.data.values():
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), [conv.weight, linear.weight])
        for n, gr, layer in zip(names, grads, (conv, linear)):
            gw = gr * layer.weight.detach()
            s = gw.abs() + 0.5 * gw.square()
            domain[n].append(s / s.mean())
    for name, layer in zip(names, (conv, linear)):
        r = rows[name].double()
        h = (2 * r.T @ r / len(r)).numpy()
        w = layer.weight.detach().flatten(1).double().numpy()
        general = torch.from_numpy(_obs_reference(w, h)).float().reshape(layer.weight.shape)
        d = sum(domain[name]) / len(domain[name])
        expected = 0.5 * general / general.mean() + 0.5 * d / d.mean()
        torch.testing.assert_close(scores[name], expected, rtol=2e-4, atol=1e-6)


def test_recovery_keeps_pruned_weights_at_zero_and_replays_through_the_chain(tiny_cfg, one_thread):
    cfg, datamodule, method = tiny_method(tiny_cfg)
    config = {"_target_": "dgkit.compress.prune.UnstructuredPrune", "sparsity": 0.5, "recover_steps": 3,
              "recover_lr": 1e-2}  # fmt: skip
    link = UnstructuredPrune(**{k: v for k, v in config.items() if k != "_target_"})
    names = link.layers(method)
    before = {n: method.get_submodule(n).weight.detach().clone() for n in names}
    state = link.transform(method, TransformContext(AFTER_FIT, datamodule))
    assert state["report"]["recovery"]["steps"] == 3
    moved = []
    for name in names:
        w0, w = before[name].flatten(), method.get_submodule(name).weight.detach().flatten()
        smallest = torch.sort(w0.abs()).indices[: round(0.5 * w0.numel())]
        assert torch.all(w[smallest] == 0)  # three Adam steps later
        assert state["layers"][name] == pytest.approx(0.5, abs=1 / w0.numel())
        kept = torch.ones_like(w0, dtype=torch.bool)
        kept[smallest] = False
        moved.append(not torch.equal(w[kept], w0[kept]))
    assert all(moved)  # the surviving weights were fine-tuned
    record = {"config": config, "stage": AFTER_FIT, "state": weights_only_roundtrip(state)}
    fresh = build(cfg)[1].eval()
    replay_chain([record], fresh, AFTER_FIT)
    fresh.load_state_dict(method.state_dict())
    x = torch.randn(2, 3, 16, 16)
    method.eval()
    assert torch.equal(fresh(x), method(x))


# ---- structured -------------------------------------------------------------------------------------------------
def test_structured_vit_removes_heads_and_mlp_channels_and_replays(tiny_cfg, one_thread):
    cfg, datamodule, method = tiny_method(tiny_cfg, "backbone=vit_digits", "method=dann")
    discriminator = copy.deepcopy(method.discriminator.state_dict())
    params_before = sum(p.numel() for p in method.parameters())
    x = torch.randn(4, 3, 16, 16)
    config = {"_target_": "dgkit.compress.structured.StructuredPrune", "target": ["mlp", "heads"], "ratio": 0.5,
              "importance": "taylor", "calibration": {"images_per_domain": 8}}  # fmt: skip
    link = StructuredPrune(**{k: v for k, v in config.items() if k != "_target_"})
    state = link.transform(method, TransformContext(AFTER_FIT, datamodule))
    y = method(x)
    assert y.shape == (4, 3)
    vit = method.backbone.model
    for block in vit.blocks:  # 3 heads of 32 dims: ceil(1.5) = 2 removed; MLP 384 -> 192; residual width 96 kept
        assert (block.attn.num_heads, block.attn.head_dim, block.attn.attn_dim) == (1, 32, 32)
        assert block.attn.qkv.out_features == 96 and block.attn.proj.out_features == 96
        assert (block.mlp.fc1.out_features, block.mlp.fc2.in_features, block.mlp.fc2.out_features) == (192, 192, 96)
    assert vit.patch_embed.proj.out_channels == 96 and method.classifier.in_features == 96
    # per block: qkv loses 192 rows (+bias), proj 64 input columns, fc1 192 rows (+bias), fc2 192 input columns
    removed = len(vit.blocks) * (192 * 97 + 64 * 96 + 192 * 97 + 192 * 96)
    params_after = sum(p.numel() for p in method.parameters())
    assert params_after == params_before - removed
    assert state["report"]["params"][1] < state["report"]["params"][0]
    assert all(torch.equal(v, method.discriminator.state_dict()[k]) for k, v in discriminator.items())
    assert state["calibration"]["domains"] == ["a", "b"]
    record = {"config": config, "stage": AFTER_FIT, "state": weights_only_roundtrip(state)}
    fresh = build(cfg)[1].eval()
    replay_chain([record], fresh, AFTER_FIT)
    fresh.load_state_dict(method.state_dict())
    assert torch.equal(fresh(x), y)


def test_structured_conv_keeps_the_feature_width_and_replays(tiny_cfg, one_thread):
    cfg, datamodule, method = tiny_method(tiny_cfg, "backbone=small_cnn_lite")
    params_before = sum(p.numel() for p in method.parameters())
    link = StructuredPrune(target="conv", ratio=0.5)
    state = link.transform(method, TransformContext(AFTER_FIT))  # magnitude: no data needed
    convs = [method.backbone.features[i] for i in (0, 3, 6, 9)]
    norms = [method.backbone.features[i] for i in (2, 5, 8, 11)]
    assert [c.out_channels for c in convs] == [16, 32, 32, 64]  # the last conv feeds the head: kept
    assert [c.in_channels for c in convs] == [3, 16, 32, 32]
    assert [(n.num_channels, n.num_groups) for n in norms] == [(16, 8), (32, 8), (32, 8), (64, 8)]
    assert method.classifier.in_features == 64
    assert state["report"]["skipped"] == ["backbone.features.9"]
    expected = sum(c.weight.numel() + c.bias.numel() for c in convs) + sum(2 * n.num_channels for n in norms)
    expected += method.classifier.weight.numel() + method.classifier.bias.numel()
    assert sum(p.numel() for p in method.parameters()) == expected < params_before
    x = torch.randn(3, 3, 16, 16)
    y = method(x)
    assert y.shape == (3, 3)
    fresh = build(cfg)[1].eval()
    link.replay(fresh, weights_only_roundtrip(state))
    fresh.load_state_dict(method.state_dict())
    assert torch.equal(fresh(x), y)


# ---- validation and the protocol ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "valid"),
    [
        (lambda: UnstructuredPrune(importance="snip"), "magnitude"),
        (lambda: UnstructuredPrune(importance="wanda", combine="max"), "weighted"),
        (lambda: StructuredPrune(target="blocks"), "heads"),
        (lambda: StructuredPrune(importance="wanda"), "taylor"),
        (lambda: StructuredPrune(combine="median"), "min"),
        (lambda: UnstructuredPrune(combine="weighted"), "domain_weights"),
    ],
)
def test_bad_choices_name_the_valid_ones(make, valid):
    with pytest.raises(ValueError, match=valid):
        make()


def test_structured_heads_refuses_a_cnn(tiny_cfg):
    _, _, method = tiny_method(tiny_cfg, "backbone=small_cnn_lite")
    with pytest.raises(ValueError, match="no Linear layer|no root layer"):
        StructuredPrune(target="heads").transform(method, TransformContext(AFTER_FIT))


@pytest.mark.parametrize("importance", ["wanda", "dpruner"])
def test_a_layer_off_the_forward_path_is_named(importance, one_thread):
    model = conv_toy()
    model.backbone = nn.ModuleDict({"body": model.backbone[:5], "unused": nn.Linear(5, 5)})
    model.forward = lambda x: model.classifier(model.backbone["body"](x))
    with pytest.raises(ValueError, match=r"backbone\.unused.*exclude"):
        UnstructuredPrune(importance=importance).transform(model, TransformContext(AFTER_FIT, image_data()))


def test_calibration_and_recovery_never_read_held_out_domains(tiny_cfg, one_thread):
    _, datamodule, method = tiny_method(tiny_cfg)
    for domain in datamodule.test_domains:
        datamodule.benchmark.datasets[domain] = HeldOut()
    context = TransformContext(AFTER_FIT, datamodule)
    calibration = {"images_per_domain": 8}
    state = UnstructuredPrune(importance="dpruner", recover_steps=1, calibration=calibration).transform(method, context)
    assert state["calibration"]["domains"] == datamodule.source_domains
    state = StructuredPrune(importance="taylor", recover_steps=1, calibration=calibration).transform(method, context)
    assert state["calibration"]["domains"] == datamodule.source_domains
    model, data = conv_toy(), image_data("abc")  # FakeData's held-out domain raises too
    state = UnstructuredPrune(importance="wanda").transform(model, TransformContext(AFTER_FIT, data))
    assert state["calibration"]["domains"] == ["a", "b", "c"]
