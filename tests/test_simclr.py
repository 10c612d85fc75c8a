"""SimCLR with BSS: NT-Xent by hand, two-view data, per-column BSS, the exported backbone, the linear probe."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dgkit.backbones import SmallCNN, TimmBackbone
from dgkit.backbones.base import DataConfig
from dgkit.data import DGDataModule
from dgkit.data.benchmarks import synthetic
from dgkit.data.style import BatchColorJitter, BatchStylesStandardization, normalize, unnormalize
from dgkit.export import export_backbone
from dgkit.methods.linear_probe import LinearProbe
from dgkit.methods.simclr import SimCLR, nt_xent
from dgkit.run import train


def test_nt_xent_matches_hand_computation():
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(2, 5)), rng.normal(size=(2, 5))
    t = 0.3
    z = np.concatenate([z1, z2])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)  # 4 unit embeddings: images 0, 1 (view 1), 0, 1 (view 2)
    s = z @ z.T / t
    positive = [2, 3, 0, 1]
    losses = []
    for i in range(4):
        others = [j for j in range(4) if j != i]
        losses.append(-s[i, positive[i]] + np.log(np.sum(np.exp(s[i, others]))))
    got = nt_xent(torch.tensor(z1), torch.tensor(z2), temperature=t)
    assert got.item() == pytest.approx(np.mean(losses), rel=1e-6)


def _dm(**kw) -> DGDataModule:
    args = dict(test_domains=["c"], data_config=DataConfig((16, 16), mean=(0.5,) * 3, std=(0.5,) * 3), batch_size=4)
    args.update(kw)
    return DGDataModule(synthetic(n_per_domain=40), **args)


def test_two_views_per_image_from_the_pipeline():
    batch, _, _ = next(iter(_dm(views=2, augment="digits").train_dataloader()))
    x, y = batch["a"]
    assert x.shape == (2, 4, 3, 16, 16) and y.shape == (4,)
    assert not torch.equal(x[0], x[1])  # two independent draws of the random shift
    batch, _, _ = next(iter(_dm().train_dataloader()))
    assert batch["a"][0].shape == (4, 3, 16, 16)  # the 1-view path is unchanged


def test_labels_per_class_picks_exactly_k_deterministically():
    dm = _dm(labels_per_class=3)
    for d in dm.source_domains:
        labels = dm.benchmark.datasets[d].labels
        picked = dm.train_indices[d]
        assert set(picked) <= set(dm.splits[(d, "in")])
        assert np.bincount(labels[picked], minlength=3).tolist() == [3, 3, 3]
        assert len(dm.train_split(d)) == 9
    assert _dm(labels_per_class=3).train_indices["a"].tolist() == dm.train_indices["a"].tolist()
    assert _dm(labels_per_class=3, test_domains=["b"]).train_indices["a"].tolist() == dm.train_indices["a"].tolist()
    assert _dm(labels_per_class=3, split_seed=1).train_indices["a"].tolist() != dm.train_indices["a"].tolist()
    assert len(dm.split("a", "in")) == len(dm.splits[("a", "in")])  # evaluation keeps every image
    with pytest.raises(ValueError, match="data.labels_per_class=40"):
        _dm(labels_per_class=40)


def test_batch_color_jitter_shares_one_draw():
    x = torch.rand(6, 3, 8, 8) * 0.5 + 0.1
    out = BatchColorJitter(brightness=0.5, contrast=0, saturation=0, hue=0, p=1.0, seed=0)(x)
    ratio = out / x
    assert torch.allclose(ratio, ratio.flatten()[0], atol=1e-5) and not torch.allclose(ratio, torch.ones(1))


def test_each_view_column_gets_its_own_standardisation():
    backbone = SmallCNN(widths=(8, 8, 8, 8), img_size=16)
    method = SimCLR(backbone, 3, ["a", "b", "c"], ["c"], color_jitter=None)
    method.bss = BatchStylesStandardization(r_min=0.05, r_max=0.5, seed=1)
    cfg = backbone.data_config
    views = normalize(torch.rand(2, 6, 3, 16, 16), cfg.mean, cfg.std)  # (V, N, C, H, W)
    got = [method._augment_column(v) for v in views]
    replay = BatchStylesStandardization(r_min=0.05, r_max=0.5, seed=1)
    for v in range(2):  # the column's own draw, in [0, 1] pixel space
        expected = normalize(replay.standardize(unnormalize(views[v], cfg.mean, cfg.std)), cfg.mean, cfg.std)
        torch.testing.assert_close(got[v], expected)
    losses = method.training_losses({"a": (views[:, :3], torch.zeros(3)), "b": (views[:, 3:], torch.zeros(3))})
    assert losses["loss"].ndim == 0 and torch.isfinite(losses["loss"])


def test_simclr_run_exports_backbone_a_linear_probe_loads(tiny_cfg, tmp_path):
    short = ("trainer.max_steps=2", "trainer.val_check_interval=2")
    final = train(tiny_cfg("method=simclr", "+augment=bss", *short))
    path = tmp_path / "run" / "backbone.safetensors"
    assert final["backbone_weights"] == str(path) and (tmp_path / "run" / "done").exists()
    saved = load_file(str(path))
    assert not any("projector" in k or "classifier" in k for k in saved)
    state = TimmBackbone("test_vit", model_kwargs={"img_size": 16}, weights=str(path)).model.state_dict()
    assert set(saved) == set(state) and all(torch.equal(saved[k], state[k]) for k in saved)
    probe = train(
        tiny_cfg("method=linear_probe", f"backbone.weights={path}", "+data.labels_per_class=2", *short, out="probe")
    )
    assert probe["step"] == 2 and "backbone_weights" not in probe


def test_exported_small_cnn_loads_with_weights_option(tmp_path):
    source = SmallCNN(widths=(8, 16, 16, 16), img_size=16)
    path = export_backbone(source, tmp_path / "cnn.safetensors")
    loaded = SmallCNN(widths=(8, 16, 16, 16), img_size=16, weights=str(path))
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded(x), source(x))
    with pytest.raises(ValueError, match="shape mismatch"):
        SmallCNN(widths=(8, 16, 16, 32), img_size=16, weights=str(path))


def test_linear_probe_only_trains_the_head():
    backbone = SmallCNN(widths=(8, 8, 8, 8), img_size=16, norm="batch")
    method = LinearProbe(backbone, 3, ["a", "b", "c"], ["c"])
    method.train()
    assert not backbone.training and all(not p.requires_grad for p in backbone.parameters())
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    optimizer = method.configure_optimizers()
    loss = method.training_losses({"a": (torch.randn(6, 3, 16, 16), torch.arange(6) % 3)})["loss"]
    loss.backward()
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())  # BN running stats too
    assert method.classifier[1].weight.grad is not None


class _ScaledFeatures(torch.nn.Module):
    """A fixed 'backbone' returning its input features times a tiny scale (like a random GroupNorm CNN's)."""

    num_features = 4

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


@pytest.mark.parametrize("feature_norm", [True, False])
def test_probe_feature_norm_standardises_tiny_features(feature_norm):
    # two classes separated along feature 0; features scaled by 1e-3 (the raw head barely moves in 100 steps)
    torch.manual_seed(0)  # the head's initialisation: the outcome must not depend on which tests ran before
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(256) % 2
    x = torch.randn(256, 4, generator=gen, dtype=torch.float64)
    x[:, 0] += 3.0 * (2 * y - 1)
    method = LinearProbe(_ScaledFeatures(1e-3), 2, ["a", "b"], ["b"], feature_norm=feature_norm)
    optimizer = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=1e-2)
    method.train()
    for _ in range(100):
        optimizer.zero_grad()
        loss = method.training_losses({"a": (x.float(), y)})["loss"]
        loss.backward()
        optimizer.step()
    method.eval()
    with torch.no_grad():
        accuracy = (method(x.float()).argmax(1) == y).double().mean().item()
    if feature_norm:
        bn = method.classifier[0]
        assert not any(p.requires_grad for p in bn.parameters())  # parameter-free
        # running statistics: an exponential average (momentum 0.1, 100 identical batches) from mean 0 / var 1
        # towards the float64 mean and unbiased variance of the scaled features
        kept = 0.9**100
        torch.testing.assert_close(bn.running_mean.double(), (1 - kept) * (x * 1e-3).mean(0), atol=1e-9, rtol=1e-4)
        torch.testing.assert_close(bn.running_var.double(), kept + (1 - kept) * (x * 1e-3).var(0), atol=1e-9, rtol=1e-4)
        assert accuracy > 0.95
    else:
        assert isinstance(method.classifier, torch.nn.Linear)
        # the same schedule cannot fit features this small without standardisation: logits move by about
        # |w| · 3e-3, so the cross-entropy stays near ln 2 (the accuracy is then a coin toss of the init's bias)
        assert loss.item() > 0.6


class _CommonModeFeatures(torch.nn.Module):
    """A trainable 'backbone' whose features are a large shared vector plus a small image-dependent part."""

    num_features = 16

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.common = torch.nn.Parameter(torch.randn(16, generator=gen))
        self.mix = torch.nn.Linear(8, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.common + 0.01 * self.mix(x.flatten(1))


@pytest.mark.parametrize("batchnorm", [True, False])
def test_projector_batchnorm_prevents_common_mode_collapse(batchnorm):
    torch.manual_seed(0)
    method = SimCLR(_CommonModeFeatures(), 2, ["a", "b"], ["b"], color_jitter=None, projector_batchnorm=batchnorm)
    optimizer = torch.optim.Adam(method.parameters(), lr=1e-3)
    images = torch.randn(32, 8, 1, 1)
    collapse = math.log(2 * 32 - 1)  # NT-Xent when every similarity is equal
    method.train()
    for _ in range(60):
        views = images + 0.05 * torch.randn(2, 32, 8, 1, 1)  # two noisy views of each "image"
        optimizer.zero_grad()
        loss = method.training_losses({"a": (views, torch.zeros(32, dtype=torch.long))})["loss"]
        loss.backward()
        optimizer.step()
    if batchnorm:
        assert loss.item() < collapse - 1.0  # the views of one image are found among the 63 others
    else:
        assert loss.item() > collapse - 0.1  # stuck at (or near) the collapsed value
