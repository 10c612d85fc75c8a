"""SAM backbones (``dgkit.backbones.SAMBackbone``): segment-anything's encoder behind dgkit's surface, and loading a
checkpoint written at another image size (``pos_embed`` and global ``rel_pos`` resized)."""

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dgkit.backbones import SAMBackbone
from dgkit.backbones.sam import resize_sam_state_dict
from dgkit.tasks import Segmentation

TINY = OmegaConf.load("conf/backbone/sam_tiny.yaml")


def tiny(img_size: int = 64, **kw) -> SAMBackbone:
    """``conf/backbone/sam_tiny.yaml`` at ``img_size`` (built directly: errors are not wrapped by Hydra)."""
    args = {k: v for k, v in OmegaConf.to_container(TINY).items() if k not in ("_target_", "img_size")}
    return SAMBackbone(img_size=img_size, **{**args, **kw})


def _randomise_positions(b: SAMBackbone) -> None:
    """SAM zero-initialises its position tables; give them values so that resizing is visible."""
    with torch.no_grad():
        for name, p in b.named_parameters():
            if "pos_embed" in name or "rel_pos" in name:
                p.normal_()


def test_features_are_sams_image_embedding():
    torch.manual_seed(0)
    b = instantiate(TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f = b.forward_features(x)
        assert torch.allclose(f, b.image_encoder(x), atol=1e-6)
        assert b(x).shape == (2, b.num_features) == (2, 64)
        assert torch.allclose(b(x), f.mean((2, 3)))
    assert b.data_config.input_size == (64, 64)


def test_intermediates_are_block_outputs_through_the_neck():
    torch.manual_seed(0)
    b = tiny().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        h = b.image_encoder.patch_embed(x) + b.image_encoder.pos_embed
        blocks = []
        for blk in b.image_encoder.blocks:
            h = blk(h)
            blocks.append(h)
        final, inter = b.forward_intermediates(x)
        assert torch.allclose(final, b.image_encoder(x), atol=1e-6)
        assert len(inter) == len(b.feature_info) == 2
        for got, blk_out in zip(inter, blocks):
            assert torch.allclose(got, b.image_encoder.neck(blk_out.permute(0, 3, 1, 2)), atol=1e-6)
        first = b.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        assert torch.allclose(first[0], inter[0], atol=1e-6)
        raw = tiny(intermediates="block").eval()
        raw.load_state_dict(b.state_dict())
        out = raw.forward_intermediates(x, indices=1, intermediates_only=True)
        assert torch.allclose(out[0], blocks[-1].permute(0, 3, 1, 2), atol=1e-6)
        assert raw.feature_info[0]["num_chs"] == 64 and raw.feature_info[0]["reduction"] == 16


def test_segmentation_head_trains_on_sam():
    torch.manual_seed(0)
    b = tiny()
    task = Segmentation(levels=2, width=16)
    head = task.build_head(b, 3)
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    logits = head(task.features(b, x))
    assert logits.shape == (2, 3, 64, 64)
    task.loss(logits, y).backward()
    assert b.image_encoder.blocks[0].attn.qkv.weight.grad is not None


def test_wrong_input_size_and_bad_config_are_named():
    b = tiny()
    with pytest.raises(ValueError, match="built for 64 px"):
        b(torch.randn(1, 3, 128, 128))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        tiny(img_size=100)
    with pytest.raises(ValueError, match="global_attn_indexes"):
        tiny(global_attn_indexes=[5])


def _cubic_weights(t: float, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution weights for the 4 taps around a sample at fractional offset ``t``."""

    def k(s):
        s = abs(s)
        if s <= 1:
            return (a + 2) * s**3 - (a + 3) * s**2 + 1
        if s < 2:
            return a * s**3 - 5 * a * s**2 + 8 * a * s - 4 * a
        return 0.0

    return np.array([k(t + 1), k(t), k(1 - t), k(2 - t)])


def _bicubic_numpy(img: np.ndarray, out: int) -> np.ndarray:
    """Independent separable bicubic resize of ``(G, G)`` to ``(out, out)``: half-pixel centres, clamped border."""
    n = img.shape[0]
    mat = np.zeros((out, n))
    for i in range(out):
        src = (i + 0.5) * n / out - 0.5
        base = int(np.floor(src))
        for w, j in zip(_cubic_weights(src - base), range(base - 1, base + 3)):
            mat[i, min(max(j, 0), n - 1)] += w
    return mat @ img @ mat.T


def test_resizing_matches_an_independent_interpolation():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(31, 8)).astype(np.float32)  # a global rel_pos at 256 px (grid 16)
    pos = rng.normal(size=(1, 16, 16, 4)).astype(np.float32)
    own = {
        "image_encoder.pos_embed": torch.zeros(1, 8, 8, 4),
        "image_encoder.blocks.1.attn.rel_pos_h": torch.zeros(15, 8),
    }
    sd = {
        "image_encoder.pos_embed": torch.from_numpy(pos),
        "image_encoder.blocks.1.attn.rel_pos_h": torch.from_numpy(table),
    }
    out = resize_sam_state_dict(sd, own, global_blocks=[1])
    src = np.clip((np.arange(15) + 0.5) * 31 / 15 - 0.5, 0, 30)  # half-pixel centres, as F.interpolate(linear)
    expected = np.stack([np.interp(src, np.arange(31), table[:, c]) for c in range(8)], 1)
    np.testing.assert_allclose(out["image_encoder.blocks.1.attn.rel_pos_h"].numpy(), expected, atol=1e-5)
    for c in range(4):
        np.testing.assert_allclose(
            out["image_encoder.pos_embed"][0, :, :, c].numpy(), _bicubic_numpy(pos[0, :, :, c], 8), atol=1e-4
        )


def test_checkpoint_written_at_256_loads_at_128(tmp_path):
    torch.manual_seed(0)
    src = tiny(256)
    _randomise_positions(src)
    path = tmp_path / "sam_tiny_256.pth"
    torch.save(src.state_dict(), path)
    dst = tiny(128, weights=str(path)).eval()
    s, d = src.state_dict(), dst.state_dict()
    assert s["image_encoder.pos_embed"].shape == (1, 16, 16, 64) and d["image_encoder.pos_embed"].shape == (1, 8, 8, 64)
    # global block 1: 2*16-1 = 31 -> 2*8-1 = 15 rows; windowed block 0: 2*4-1 = 7 rows at every size
    assert (
        s["image_encoder.blocks.1.attn.rel_pos_h"].shape[0] == 31
        and d["image_encoder.blocks.1.attn.rel_pos_h"].shape[0] == 15
    )
    resized = resize_sam_state_dict(s, d, global_blocks=[1])
    for k in d:
        assert torch.equal(d[k], resized[k]), k
        if "pos_embed" not in k and not k.startswith("image_encoder.blocks.1.attn.rel_pos"):
            assert torch.equal(d[k], s[k]), k  # everything else is copied as is
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        f, inter = dst.forward_intermediates(x)
    assert f.shape == (2, 64, 8, 8) and all(t.shape == (2, 64, 8, 8) for t in inter)
    assert torch.isfinite(f).all()


def test_official_layout_with_decoder_keys_and_other_windows(tmp_path):
    torch.manual_seed(0)
    full = tiny(128, prompt_decoder=True)
    path = tmp_path / "sam.pth"
    torch.save(full.state_dict(), path)
    enc = tiny(64, weights=str(path))  # decoder keys dropped when the backbone has no decoder
    assert not any(k.startswith("mask_decoder") for k in enc.state_dict())
    single = tiny(64, weights=str(path), prompt_decoder=True, multimask_outputs=0)  # MapSAM: one mask token
    assert single.mask_decoder.mask_tokens.weight.shape[0] == 1
    assert torch.equal(
        single.mask_decoder.transformer.layers[0].mlp.lin1.weight,
        full.mask_decoder.transformer.layers[0].mlp.lin1.weight,
    )
    with pytest.raises(ValueError, match="rel_pos"):
        tiny(64, weights=str(path), window_size=2)


def test_vit_configs_match_segment_anything_builders():
    from segment_anything.build_sam import build_sam_vit_b  # noqa: F401 (the sizes below are its arguments)

    sizes = {
        "b": (768, 12, 12, [2, 5, 8, 11]),
        "l": (1024, 24, 16, [5, 11, 17, 23]),
        "h": (1280, 32, 16, [7, 15, 23, 31]),
    }
    for v, (dim, depth, heads, glob) in sizes.items():
        cfg = OmegaConf.load(f"conf/backbone/sam_vit_{v}.yaml")
        assert (cfg.embed_dim, cfg.depth, cfg.num_heads, list(cfg.global_attn_indexes)) == (dim, depth, heads, glob)
        assert cfg.window_size == 14 and cfg.out_chans == 256
