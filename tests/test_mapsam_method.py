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


@pytest.mark.parametrize("double_softmax, multimask", [(False, 0), (True, 0), (False, 3)])
def test_one_decoder_call_for_a_batch_equals_the_per_image_calls(double_softmax, multimask):
    """SAM's own ``predict_masks`` repeats one embedding per prompt row, so the reference calls it image by image;
    with masks and semantic prompts, per-image :func:`decode` calls (``None`` where a batch row is zero)."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    from dgkit.methods.mapsam_parts import automatic_points, decode

    torch.manual_seed(0)
    c, g, b = 32, 4, 4
    pe = PromptEncoder(embed_dim=c, image_embedding_size=(g, g), input_image_size=(16 * g,) * 2, mask_in_chans=4)
    transformer = TwoWayTransformer(depth=2, embedding_dim=c, mlp_dim=64, num_heads=2)
    dec = MaskDecoder(
        transformer_dim=c, transformer=transformer, num_multimask_outputs=multimask, iou_head_hidden_dim=c
    )
    emb, coarse = torch.randn(b, c, g, g), torch.randn(b, 1, g, g)
    keep = (coarse.sigmoid() >= 0.5).flatten(1)
    keep[1], keep[2] = False, True  # a fully masked row (falls back to all keys) and an unmasked one
    semantic = torch.randn(b, c)
    semantic[1] = 0  # image 1 has no foreground: no semantic prompt
    with torch.no_grad():
        sparse, dense = pe(points=automatic_points(coarse, (16 * g,) * 2), boxes=None, masks=None)
        image_pe = pe.get_dense_pe()
        plain = decode(dec, emb, image_pe, sparse, dense)
        for i in range(b):
            ref = dec.predict_masks(emb[i : i + 1], image_pe, sparse[i : i + 1], dense[i : i + 1])[0][:, :1]
            torch.testing.assert_close(plain[i : i + 1], ref, atol=1e-5, rtol=1e-5)
        batched = decode(dec, emb, image_pe, sparse, dense, keep, semantic, True, double_softmax)
        for i in range(b):
            one = decode(
                dec, emb[i : i + 1], image_pe, sparse[i : i + 1], dense[i : i + 1], keep[i : i + 1],
                None if i == 1 else semantic[i : i + 1], True, double_softmax,
            )  # fmt: skip
            torch.testing.assert_close(batched[i : i + 1], one, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(batched, plain, atol=1e-3)  # the masks and prompts act


@pytest.mark.parametrize("flags", [{}, {"masked_attention": False, "semantic_prompt": False}])
def test_method_decodes_a_batch_as_image_by_image(flags):
    """From the same embeddings and coarse masks (the encoder's batched GEMMs differ from per-image ones by ~1e-6,
    enough to swap two near-equal top-k pixels of an upsampled coarse mask, so they are shared here)."""
    method = _setup(**flags).eval()
    torch.manual_seed(3)
    final, coarse = torch.randn(3, 64, 4, 4), torch.randn(3, 1, 4, 4)
    coarse[1] = -5.0  # no foreground: no semantic prompt, a fully masked first layer
    with torch.no_grad():
        batched = method.decode_masks(final, coarse, (64, 64))
        for i in range(3):
            one = method.decode_masks(final[i : i + 1], coarse[i : i + 1], (64, 64))
            torch.testing.assert_close(batched[i : i + 1], one, atol=1e-5, rtol=1e-5)


def test_the_presets_warmup_poly_schedule_follows_the_formula_over_the_step_budget():
    from tests.conftest import compose_cfg

    cfg = compose_cfg(["+exp=hist_maps_mapsam", "trainer.max_steps=40"])
    param = nn.Parameter(torch.zeros(1))
    optimizer = instantiate(cfg.method.optimizer)([param])
    scheduler = instantiate(cfg.method.scheduler)(optimizer)
    base, total, warmup = 5e-3, 40, 2  # MapSAM's lr; 5 % of 40 steps of warm-up
    assert optimizer.param_groups[0]["lr"] == pytest.approx(base / warmup)
    expected = [base * (t + 1) / warmup if t < warmup else base * (1 - (t - warmup) / (total - warmup)) ** 0.9
                for t in range(total)] + [0.0, 0.0]  # fmt: skip
    seen = []
    for _ in range(total + 2):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert seen[warmup] == pytest.approx(base) and seen[total - 1] < base * 0.05


def test_warmup_poly_options():
    from dgkit.methods.base import WarmupPolyLR

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    assert WarmupPolyLR(opt, total_steps=1000, warmup_steps=250).warmup == 250  # MapSAM's 250 iterations
    assert WarmupPolyLR(opt, total_steps=300, warmup_fraction=0.1).warmup == 30
    assert [round(WarmupPolyLR(opt, 4, power=1.0).factor(t), 6) for t in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError, match="warmup_steps or warmup_fraction, not both"):
        WarmupPolyLR(opt, 100, warmup_steps=5, warmup_fraction=0.1)
    with pytest.raises(
        ValueError, match=r"total_steps=10 must be >= 1 \(trainer.max_steps\), the warm-up \(10 steps\)"
    ):
        WarmupPolyLR(opt, 10, warmup_steps=10)


def test_the_preset_trains_end_to_end_with_its_schedule(tmp_path, one_thread):
    """``+exp=hist_maps_mapsam`` through ``dgkit.run.train`` on a tiny 2-class folder: Lightning steps the warm-up +
    poly scheduler every step (the logged lr follows the formula) and ``miou/`` records are written."""
    from dgkit.run import train
    from dgkit.utils.io import read_jsonl
    from tests.conftest import compose_cfg
    from tests.test_seg_data import write_seg_tree

    root = write_seg_tree(tmp_path / "maps", n=6, size=16)
    cfg = compose_cfg(
        ["+exp=hist_maps_mapsam", "data=seg_folder", f"data.root={root}", "data.num_classes=2",
         "data.test_domains=[c]", "data.image_size=32", "data.batch_size=2", "data.holdout_fraction=0.34",
         "trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.enable_progress_bar=false",
         "trainer.accelerator=cpu", "logger=none", "print_summary=false", "method.scheduler.warmup_fraction=0.5"],
        tmp_path / "run",
    )  # fmt: skip
    train(cfg)
    records = read_jsonl(tmp_path / "run" / "results.jsonl")
    assert {f"miou/{d}/{s}" for d in "abc" for s in ("in", "out")} <= {k for r in records for k in r}
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    (state,) = ckpt["lr_schedulers"]
    assert state["last_epoch"] == 4 and state["warmup"] == 2 and state["total_steps"] == 4  # stepped every step
    assert state["_last_lr"] == [0.0]  # (1 - (4 - 2) / (4 - 2)) ** 0.9 once T steps are done
