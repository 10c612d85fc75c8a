"""method=mapsam on sam_tiny + adapter=dora_sam: a step changes only DoRA, decoder, prompt-encoder and SPGen
parameters; outputs are two-class logits at the input size; wrong setups are refused."""

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from dgkit.backbones import SAMBackbone, SmallCNN
from dgkit.methods import MapSAM
from dgkit.search import without_search
from dgkit.tasks import Segmentation


def _setup(**method_kw):
    cfg = OmegaConf.load("conf/backbone/sam_tiny.yaml")
    args = {k: v for k, v in OmegaConf.to_container(cfg).items() if k not in ("_target_", "img_size")}
    torch.manual_seed(0)
    backbone = SAMBackbone(img_size=64, **{**args, "prompt_decoder": True, "multimask_outputs": 0})
    instantiate(without_search(OmegaConf.load("conf/adapter/dora_sam.yaml"))).apply(backbone)
    return MapSAM(backbone, 2, ["a", "b"], ["b"], task=Segmentation(), **method_kw)


def test_a_step_changes_only_dora_decoder_prompt_encoder_and_spgen():
    method = _setup()
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=1e-2)
    y = torch.zeros(2, 64, 64, dtype=torch.long)
    y[:, 10:40, 20:50] = 1
    losses = method.training_losses({"a": (torch.randn(2, 3, 64, 64), y)})
    assert set(losses) == {"loss", "final", "coarse"} and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    opt.step()
    changed = {n for n, p in method.named_parameters() if not torch.equal(p, before[n])}
    dora = {n for n in changed if n.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "magnitude")}
    assert all(".attn.qkv.q." in n or ".attn.qkv.v." in n for n in dora) and dora
    groups = ("backbone.mask_decoder.", "backbone.prompt_encoder.", "spgen.")
    for g in groups:
        assert any(n.startswith(g) for n in changed), g
    assert changed - dora <= {n for n in changed if n.startswith(groups)}
    assert not any(n.startswith("backbone.image_encoder.") for n in changed - dora)  # encoder frozen


@pytest.mark.parametrize("flags", [{}, {"masked_attention": False, "semantic_prompt": False}, {"double_softmax": True}])
def test_outputs_are_two_class_logits_at_the_input_size(flags):
    method = _setup(**flags).eval()
    with torch.no_grad():
        out = method(torch.randn(3, 3, 64, 64))
        assert out.shape == (3, 2, 64, 64) and torch.isfinite(out).all()
        assert (out[:, 0] == 0).all()
        merged = method.to_inference()
        x = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(merged(x), method(x), atol=1e-4, rtol=1e-4)


def test_frozen_decoder_variant_with_a_frozen_encoder_trains_only_spgen():
    cfg = OmegaConf.load("conf/backbone/sam_tiny.yaml")
    args = {k: v for k, v in OmegaConf.to_container(cfg).items() if k not in ("_target_", "img_size")}
    backbone = SAMBackbone(img_size=64, **{**args, "prompt_decoder": True, "multimask_outputs": 0})
    instantiate(OmegaConf.load("conf/adapter/freeze.yaml")).apply(backbone)
    method = MapSAM(backbone, 2, ["a", "b"], ["b"], task=Segmentation(), variant="frozen_decoder")
    assert {n.split(".")[0] for n, p in method.named_parameters() if p.requires_grad} == {"spgen"}
    decoder_only = _setup()  # the default variant: the decoder trains whatever the adapter froze
    assert any(p.requires_grad for p in decoder_only.backbone.mask_decoder.parameters())
    with pytest.raises(ValueError, match="method.variant='zero'.*'trained_decoder', 'frozen_decoder'"):
        MapSAM(backbone, 2, ["a", "b"], ["b"], task=Segmentation(), variant="zero")


def test_wrong_setups_are_refused():
    sam = SAMBackbone(img_size=64, embed_dim=32, depth=1, num_heads=2, global_attn_indexes=[0])
    assert not sam.prompt_decoder and not SmallCNN().prompt_decoder  # declared, never probed
    with pytest.raises(ValueError, match="num_classes=2"):
        MapSAM(sam, 3, ["a"], [])
    fix = r"backbone=sam_tiny\|sam_vit_b\|sam_vit_l\|sam_vit_h backbone.prompt_decoder=true"
    with pytest.raises(ValueError, match=f"SAMBackbone here has none: use {fix}"):
        MapSAM(sam, 2, ["a"], [])
    with pytest.raises(ValueError, match=f"SmallCNN here has none: use {fix}"):
        MapSAM(SmallCNN(), 2, ["a"], [])
    cnn = SmallCNN()
    cnn.mask_decoder = cnn.prompt_encoder = nn.Identity()  # attributes alone do not make the capability
    with pytest.raises(ValueError, match="prompt_decoder capability"):
        MapSAM(cnn, 2, ["a"], [])
