"""Declared backbone capabilities: ``forward_intermediates`` (timm 1.0's surface, checked against a manual
layer-by-layer pass and against timm's own models) and ``stages()`` (the split ITTA runs, refused with a clear
error by backbones that do not declare it)."""

import pytest
import torch
from torch import nn

from dgkit.backbones import Backbone, SmallCNN, StagesNotSupported, TimmBackbone
from dgkit.backbones.stages import backbone_stages


@pytest.fixture(scope="module")
def cnn() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(widths=[8, 8, 16, 16], strides=[1, 2, 2, 1], img_size=16).eval()


@pytest.fixture(scope="module", params=["test_vit", "resnet18"])
def timm_backbone(request) -> TimmBackbone:
    torch.manual_seed(0)
    kwargs = {"img_size": 32} if request.param == "test_vit" else {}
    return TimmBackbone(request.param, input_size=32, model_kwargs=kwargs).eval()


def _manual_blocks(cnn: SmallCNN, x: torch.Tensor) -> list[torch.Tensor]:
    """Block outputs computed layer by layer: conv, ReLU, norm, four times."""
    out = []
    for i in range(4):
        conv, _, norm = cnn.features[3 * i : 3 * i + 3]
        x = norm(torch.relu(conv(x)))
        out.append(x)
    return out


def test_small_cnn_intermediates_match_a_manual_pass(cnn):
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        final, inter = cnn.forward_intermediates(x)
        expected = _manual_blocks(cnn, x)
        torch.testing.assert_close(final, cnn.forward_features(x))
    assert len(inter) == len(cnn.feature_info) == 4
    for got, want, info in zip(inter, expected, cnn.feature_info):
        torch.testing.assert_close(got, want)
        assert got.shape[1] == info["num_chs"] and 16 // got.shape[-1] == info["reduction"]
    assert [i["reduction"] for i in cnn.feature_info] == [1, 2, 4, 4]


@pytest.mark.parametrize(
    ("indices", "taken"), [(None, [0, 1, 2, 3]), (2, [2, 3]), ([0, 2], [0, 2]), ([-1, -3], [1, 3]), ((1,), [1])]
)
def test_small_cnn_indices_and_intermediates_only(cnn, indices, taken):
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = _manual_blocks(cnn, x)
        inter = cnn.forward_intermediates(x, indices=indices, intermediates_only=True)
    assert isinstance(inter, list) and len(inter) == len(taken)
    for got, i in zip(inter, taken):  # in forward order, as timm gives them
        torch.testing.assert_close(got, expected[i])


def test_small_cnn_stop_early_and_bad_arguments(cnn):
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        final, inter = cnn.forward_intermediates(x, indices=[1], stop_early=True)
        expected = _manual_blocks(cnn, x)
    torch.testing.assert_close(final, expected[1])  # as timm: the "final" features are the last block run
    torch.testing.assert_close(inter[0], expected[1])
    with pytest.raises(ValueError, match="output_fmt='NLC'.*'NCHW'"):
        cnn.forward_intermediates(x, output_fmt="NLC")
    with pytest.raises(AssertionError, match="out of range"):  # timm's own check (feature_take_indices)
        cnn.forward_intermediates(x, indices=[4])


@pytest.mark.parametrize("indices", [None, 2, [0, 1], [-1, -2]])
def test_timm_intermediates_are_timms(timm_backbone, indices):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, inter = timm_backbone.forward_intermediates(x, indices=indices)
        ref_final, ref_inter = timm_backbone.model.forward_intermediates(x, indices=indices)
        only = timm_backbone.forward_intermediates(x, indices=indices, intermediates_only=True)
        torch.testing.assert_close(final, timm_backbone.forward_features(x))
    torch.testing.assert_close(final, ref_final)
    expected_n = len(timm_backbone.feature_info) if indices is None else (indices if isinstance(indices, int) else 2)
    assert len(inter) == len(ref_inter) == len(only) == expected_n
    for a, b, c in zip(inter, ref_inter, only):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(c, b)
        assert a.dim() == 4  # NCHW, ViT tokens included


def test_timm_feature_info_declares_the_intermediates(timm_backbone):
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        inter = timm_backbone.forward_intermediates(x, intermediates_only=True)
    assert [t.shape[1] for t in inter] == [i["num_chs"] for i in timm_backbone.feature_info]
    assert len(inter) == (6 if timm_backbone.model.default_cfg["architecture"] == "test_vit" else 5)


def _check_stages(backbone: Backbone) -> None:
    x = torch.randn(2, 3, *backbone.data_config.input_size)
    stages = backbone.stages()
    with torch.no_grad():
        torch.testing.assert_close(stages.forward(x), backbone(x), atol=1e-5, rtol=1e-5)
    params = {id(p) for p in backbone.parameters()}
    assert all(id(p) in params for s in [stages.stem, *stages.stages] for p in s.parameters())  # shared, not copied


def test_small_cnn_stages_reproduce_the_backbone(cnn):
    _check_stages(cnn)
    assert len(cnn.stages().stages) == 4


def test_timm_stages_reproduce_the_backbone(timm_backbone):
    _check_stages(timm_backbone)


class _NoStages(Backbone):
    """A backbone that declares neither capability."""

    num_features = 4

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        return features


def test_undeclared_capabilities_raise_clear_errors():
    with pytest.raises(StagesNotSupported, match="_NoStages cannot be split into stages.*small_cnn.*timm ResNets"):
        _NoStages().stages()
    with pytest.raises(NotImplementedError, match="_NoStages does not implement forward_intermediates"):
        _NoStages().forward_intermediates(torch.randn(1, 6))
    with pytest.raises(ValueError, match="method=x needs a backbone split into stages: small_cnn .*; got _NoStages"):
        backbone_stages(_NoStages(), "method=x")
    convnext = TimmBackbone("convnext_atto", input_size=32)
    with pytest.raises(ValueError, match=r"tta=itta needs .* timm ResNets .*; got timm convnext_atto \(ConvNeXt\)"):
        backbone_stages(convnext, "tta=itta")
