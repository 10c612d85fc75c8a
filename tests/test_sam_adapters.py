"""Every adapter on SAM's encoder under ``method=mapsam``: the adapted layers are all in ``image_encoder`` (never the
prompt encoder's or the mask decoder's linears, which LoRA's default target ``mlp.lin1/2`` would match), and one
training step changes only adapter, mask-decoder, prompt-encoder and SPGen parameters."""

import re

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dgkit.adapters import LoRA, regularizers
from dgkit.adapters.core import linear_names
from dgkit.backbones import SAMBackbone
from dgkit.methods import MapSAM
from dgkit.search import without_search
from dgkit.tasks import Segmentation

ADAPTERS = ["lora", "dora", "soma", "pego", "salt", "dora_sam"]


def _sam(**kw) -> SAMBackbone:
    cfg = OmegaConf.load("conf/backbone/sam_tiny.yaml")
    args = {k: v for k, v in OmegaConf.to_container(cfg).items() if k not in ("_target_", "img_size")}
    torch.manual_seed(0)
    return SAMBackbone(img_size=64, **{**args, "prompt_decoder": True, "multimask_outputs": 0, **kw})


@pytest.mark.parametrize("name", ADAPTERS)
def test_adapters_target_the_encoder_and_a_step_changes_only_adapter_decoder_and_spgen(name):
    backbone = _sam()
    decoder_linears = [n for n in linear_names(backbone) if n.startswith(("mask_decoder.", "prompt_encoder."))]
    spec = instantiate(without_search(OmegaConf.load(f"conf/adapter/{name}.yaml")))
    if name in ("lora", "dora", "salt", "soma"):  # their default target also names the decoder's mlp.lin1/lin2
        assert any(re.search(spec.target, n) for n in decoder_linears)
    adapted = spec.apply(backbone)
    assert adapted and all(n.startswith("image_encoder.blocks.") for n in adapted)
    assert [n for n in linear_names(backbone) if n.startswith(("mask_decoder.", "prompt_encoder."))] == decoder_linears

    method = MapSAM(backbone, 2, ["a", "b"], ["b"], task=Segmentation())
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=1e-2)
    y = torch.zeros(2, 64, 64, dtype=torch.long)
    y[:, 8:40, 16:48] = 1
    torch.manual_seed(1)
    loss = method.training_losses({"a": (torch.randn(2, 3, 64, 64), y)})["loss"]
    reg = regularizers(method.backbone)
    (loss + (reg if reg is not None else 0)).backward()
    opt.step()
    changed = {n for n, p in method.named_parameters() if not torch.equal(p, before[n])}
    in_adapter = tuple(f"backbone.{n}." for n in adapted)
    groups = ("backbone.mask_decoder.", "backbone.prompt_encoder.", "spgen.")
    assert any(n.startswith(in_adapter) for n in changed)
    for g in groups:
        assert any(n.startswith(g) for n in changed), g
    outside = {n for n in changed if not n.startswith(in_adapter + groups)}
    assert not outside, f"{name} changed parameters outside the adapter, decoder and SPGen: {sorted(outside)}"
    frozen = {n for n in changed if n.startswith(in_adapter) and n.split(".")[-2] in ("base", "base_layer")}
    assert all(n.endswith(".bias") for n in frozen)  # only SoMA's adapted biases (train_bias) among base parts


def test_a_target_that_names_only_the_decoder_is_refused():
    with pytest.raises(ValueError, match="matches only layers of SAMBackbone's decoder.*target the encoder"):
        LoRA(target=r"transformer\.layers\.\d+\.mlp").apply(_sam())
