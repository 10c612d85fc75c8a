"""ITTA: stage split equals the backbone, identity mappings at init, the learned loss, only the mapping adapts,
fallback to a fixed loss, unsupported backbones fail early, and a short method=itta training step."""

import logging

import pytest
import torch
from torch import nn

from dgkit.backbones import SmallCNN, TimmBackbone
from dgkit.backbones.stages import backbone_stages
from dgkit.methods import ERM, ITTA
from dgkit.methods.itta import LearnedConsistency, mixstyle
from dgkit.run import train
from dgkit.tta import ITTAAdapter


def _cnn() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(widths=[8, 8, 8, 8], strides=[1, 2, 2, 1], img_size=16).eval()


def _vit() -> TimmBackbone:
    return TimmBackbone("test_vit", input_size=16, model_kwargs={"img_size": 16}).eval()


@pytest.mark.parametrize("make", [_cnn, lambda: TimmBackbone("resnet18", input_size=32).eval(), _vit])
def test_stage_split_reproduces_the_backbone(make):
    backbone = make()
    x = torch.randn(2, 3, *backbone.data_config.input_size)
    with torch.no_grad():
        assert torch.allclose(backbone_stages(backbone).forward(x), backbone(x), atol=1e-5)


class _Flat(nn.Module):
    """A backbone without stages (a linear map)."""

    num_features = 4

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(x)


def test_unsupported_backbone_fails_early_naming_what_is_supported():
    with pytest.raises(ValueError, match="small_cnn .* timm ResNets"):
        ITTA(_Flat(), 3, ["a", "b", "c"], ["c"])
    erm = ERM(_Flat(), 3, ["a", "b", "c"], ["c"])
    with pytest.raises(ValueError, match="tta=itta needs .* timm ResNets"):
        ITTAAdapter().bind_method(erm)


def test_itta_on_vit_tokens_starts_at_the_identity():
    erm = ERM(_vit(), 3, ["a", "b", "c"], ["c"]).eval()
    tta = ITTAAdapter().bind_method(erm)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(tta.stages.forward(x, tta._mapped), erm.backbone(x), atol=1e-5)
    with torch.enable_grad():
        assert tta.predict(x).shape == (4, 3)


def test_learned_loss_at_init_is_the_mse_on_nonnegative_inputs():
    u = torch.rand(4, 6)
    assert LearnedConsistency(6)(u).item() == pytest.approx(u.pow(2).mean().item())


def test_mixstyle_keeps_shape_and_mixes_statistics():
    import numpy as np

    h = torch.randn(4, 3, 5, 5) * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(4, 1, 1, 1)
    out = mixstyle(h, np.random.default_rng(0))
    assert out.shape == h.shape and not torch.allclose(out, h)


def test_itta_adapts_only_the_mapping_and_falls_back_to_a_fixed_loss(caplog):
    erm = ERM(_cnn(), 3, ["a", "b", "c"], ["c"]).eval()
    with caplog.at_level(logging.WARNING):
        tta = ITTAAdapter(optimizer=lambda p: torch.optim.SGD(p, lr=0.5)).bind_method(erm)
    assert tta.fixed_loss and "fixed consistency loss" in caplog.text
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():  # identity mappings at init: the mapped network is the source network
        assert torch.allclose(tta.stages.forward(x, tta._mapped), erm.backbone(x), atol=1e-6)
    before = {k: v.clone() for k, v in [*tta.backbone.state_dict().items(), *tta.classifier.state_dict().items()]}
    mapping0 = {k: v.clone() for k, v in tta.mapping.state_dict().items()}
    with torch.enable_grad():
        logits = tta.predict(x)
    assert logits.shape == (8, 3)
    after = {**tta.backbone.state_dict(), **tta.classifier.state_dict()}
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert any(not torch.equal(v, tta.mapping.state_dict()[k]) for k, v in mapping0.items())
    tta.reset()
    assert all(torch.equal(v, tta.mapping.state_dict()[k]) for k, v in mapping0.items())


def test_itta_training_step_updates_the_learned_loss(tiny_cfg, tmp_path):
    final = train(tiny_cfg("method=itta", "backbone=small_cnn_lite", "tta=itta", "threads=1"))
    assert final["tta"]["itta"]["sets"]["c"]["acc_tta"] >= 0.0
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    w = ckpt["state_dict"]["consistency.weight"]
    assert not torch.equal(w, torch.ones_like(w))  # the gradient-matching step moved the learned loss
    assert ckpt["global_step"] == 4  # two optimisers per batch, but max_steps counts batches
