"""Backbones: the uniform surface, local weight loading and its errors."""

import pytest
import torch
from safetensors.torch import save_file

from dgkit.backbones import SmallCNN, TimmBackbone
from dgkit.backbones.timm_backbone import PretrainedWeightsUnavailable


def test_small_cnn_surface():
    m = SmallCNN(img_size=28)
    x = torch.randn(2, 3, 28, 28)
    assert m.forward_features(x).shape == (2, 128, 14, 14)
    assert m(x).shape == (2, m.num_features) == (2, 128)
    assert m.data_config.input_size == (28, 28)
    with pytest.raises(ValueError, match="norm='layer'.*'group', 'batch'"):
        SmallCNN(norm="layer")


def test_timm_surface():
    m = TimmBackbone("test_vit", model_kwargs={"img_size": 32}).eval()
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, m.num_features)
    assert m.data_config.input_size == (32, 32)
    assert m.data_config.mean == (0.5, 0.5, 0.5)  # timm's own normalisation for this model, not ImageNet's


def test_unknown_timm_name():
    with pytest.raises(ValueError, match="not a timm model"):
        TimmBackbone("resnet_does_not_exist")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_roundtrip(tmp_path, suffix):
    src = TimmBackbone("test_vit", model_kwargs={"img_size": 32}).eval()
    sd = {k: v.contiguous() for k, v in src.model.state_dict().items()}
    sd["head.weight"] = torch.zeros(5, src.num_features)  # a classifier head, as in timm's files: dropped
    path = tmp_path / f"w{suffix}"
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": sd}, path)
    torch.manual_seed(123)
    dst = TimmBackbone("test_vit", model_kwargs={"img_size": 32}, weights=str(path)).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(dst(x), src(x))


def test_weights_mismatch_lists_keys(tmp_path):
    path = tmp_path / "cnn.pth"
    torch.save(SmallCNN().state_dict(), path)
    expected = r"(?s)missing keys: .*unexpected keys: features\.0\.bias, features\.0\.weight"
    with pytest.raises(ValueError, match=expected):
        TimmBackbone("test_vit", weights=str(path))


def test_pretrained_offline_error_points_to_weights(monkeypatch):
    import timm

    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("could not reach the model hub")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(PretrainedWeightsUnavailable, match="backbone.weights=/path/to/file"):
        TimmBackbone("test_vit", pretrained=True)


def test_unreachable_hub_is_asked_for_its_cache_only(monkeypatch):
    """Offline, the hub client would retry for about 50 s: it must be switched to cache-only first."""
    import timm
    from huggingface_hub import constants

    from dgkit.backbones import timm_backbone

    seen = []

    def record(name, pretrained=False, **kw):
        seen.append(constants.HF_HUB_OFFLINE)
        raise OSError("not in the cache")

    monkeypatch.setattr(timm_backbone, "_unreachable", lambda endpoint: "hub.example cannot be reached")
    monkeypatch.setattr(timm, "create_model", record)
    with pytest.raises(PretrainedWeightsUnavailable, match="hub.example cannot be reached; not in the local cache"):
        TimmBackbone("test_vit", pretrained=True)
    assert seen == [True] and constants.HF_HUB_OFFLINE is False  # restored afterwards


def test_freeze_bn_keeps_running_stats():
    m = TimmBackbone("resnet18", input_size=32, freeze_bn=True).train()
    bn = m.model.bn1
    before = bn.running_mean.clone()
    m(torch.randn(4, 3, 32, 32))
    assert not bn.training
    torch.testing.assert_close(bn.running_mean, before)
