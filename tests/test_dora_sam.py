"""DoRA-SAM (``adapter=dora_sam``): DoRA on the q and v slices of SAM's fused ``qkv``, both magnitude axes, against a
float64 reference of the formula (outputs and gradients), init and merge invariants, what trains."""

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from dgkit.adapters import DoRALinear, DoRASAM, SplitQKV, merge
from dgkit.backbones import SAMBackbone
from dgkit.search import without_search


def _tiny(**kw) -> SAMBackbone:
    cfg = OmegaConf.load("conf/backbone/sam_tiny.yaml")
    args = {k: v for k, v in OmegaConf.to_container(cfg).items() if k not in ("_target_", "img_size")}
    torch.manual_seed(0)
    return SAMBackbone(img_size=64, **{**args, **kw})


def _adapted(axis: str, **kw) -> tuple[SAMBackbone, dict[str, torch.Tensor], list[str]]:
    b = _tiny(**kw)
    original = {k: v.clone() for k, v in b.state_dict().items()}
    cfg = without_search(OmegaConf.load("conf/adapter/dora_sam.yaml"))  # a search space is not an argument
    names = instantiate(cfg, magnitude_axis=axis).apply(b)
    return b, original, names


def _reference(w, a, b, m, scale, axis):
    """W' = m ⊙ V / ‖V‖ with V = W + s B A, in float64; ``out``: row norms detached, ``in``: column norms kept."""
    v = w + scale * (b @ a)
    if axis == "in_rows":  # per-output magnitude with the norm NOT detached (not a dgkit variant; for contrast)
        return m[:, None] * v / v.norm(dim=1, keepdim=True)
    if axis == "out":
        return m[:, None] * v / v.norm(dim=1, keepdim=True).detach()
    return m[None, :] * v / v.norm(dim=0, keepdim=True)


@pytest.mark.parametrize("axis", ["out", "in"])
def test_dora_on_fused_qkv_equals_the_float64_formula(axis):
    b, original, names = _adapted(axis)
    assert names == [f"image_encoder.blocks.{i}.attn.qkv.{s}" for i in (0, 1) for s in ("q", "v")]
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in b.named_parameters():
            if "lora_" in name or "magnitude" in name:
                p.copy_(torch.randn_like(p) * (0.3 if "lora_" in name else 1.0) + (2.0 if "magnitude" in name else 0))
    qkv = b.image_encoder.blocks[0].attn.qkv
    assert isinstance(qkv, SplitQKV) and isinstance(qkv.q, DoRALinear) and type(qkv.k) is nn.Linear
    x = torch.randn(2, 4, 4, 64)
    out = qkv(x)
    r = torch.randn_like(out)
    (out * r).sum().backward()

    d = 64
    w = original["image_encoder.blocks.0.attn.qkv.weight"].double()  # (3d, d) rows [q; k; v]
    bias = original["image_encoder.blocks.0.attn.qkv.bias"].double()
    leaves, slices = {}, []
    for i, s in enumerate(("q", "k", "v")):
        w_s = w[i * d : (i + 1) * d]
        if s == "k":
            slices.append(w_s)
            continue
        layer = getattr(qkv, s)
        leaf = {n: getattr(layer, n).detach().double().requires_grad_(True) for n in ("lora_A", "lora_B", "magnitude")}
        leaves[s] = leaf
        slices.append(_reference(w_s, leaf["lora_A"], leaf["lora_B"], leaf["magnitude"], layer.scale, axis))
    fused = torch.cat(slices)  # [W'_q; W_k; W'_v], as MapSAM rebuilds it
    expected = x.double() @ fused.T + bias
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    (expected * r.double()).sum().backward()
    for s, leaf in leaves.items():
        for n, p in leaf.items():
            torch.testing.assert_close(getattr(getattr(qkv, s), n).grad.double(), p.grad, atol=1e-4, rtol=1e-4)


def test_the_two_axes_differ_in_magnitude_shape_and_gradient():
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    layers = {axis: DoRASAM(magnitude_axis=axis).wrap("x", base) for axis in ("out", "in")}
    assert layers["out"].magnitude.shape == (4,) and layers["in"].magnitude.shape == (6,)
    torch.testing.assert_close(layers["out"].magnitude, base.weight.norm(dim=1))
    torch.testing.assert_close(layers["in"].magnitude, base.weight.norm(dim=0))
    # at init (B = 0, m = ||W||) the gradient on B goes through V and, unless detached, through the norm
    x = torch.randn(5, 6)
    for layer in layers.values():
        layer(x).pow(2).sum().backward()
    v = base.weight.detach().double()
    b = torch.zeros(4, layers["out"].lora_A.shape[0], dtype=torch.float64, requires_grad=True)
    a = layers["out"].lora_A.detach().double()
    out = x.double() @ _reference(v, a, b, v.norm(dim=1), layers["out"].scale, "out").T + base.bias.double()
    out.pow(2).sum().backward()
    torch.testing.assert_close(layers["out"].lora_B.grad.double(), b.grad, atol=1e-5, rtol=1e-5)
    b.grad = None
    kept = x.double() @ _reference(v, a, b, v.norm(dim=1), 1.0, "in_rows").T  # the same with the row norm kept
    kept.add(base.bias.double()).pow(2).sum().backward()
    assert not torch.allclose(layers["out"].lora_B.grad.double(), b.grad, atol=1e-5)


@pytest.mark.parametrize("axis", ["out", "in"])
def test_init_keeps_outputs_and_merge_keeps_them_after_training(axis):
    x = torch.randn(2, 3, 64, 64)
    plain = _tiny().eval()
    b, _, _ = _adapted(axis)
    b.eval()
    with torch.no_grad():
        torch.testing.assert_close(b(x), plain(x), atol=1e-5, rtol=0)  # output-preserving at init
    opt = torch.optim.SGD([p for p in b.parameters() if p.requires_grad], lr=0.5)
    b(x).pow(2).mean().backward()
    opt.step()
    with torch.no_grad():
        adapted = b.forward_features(x)
        assert not torch.allclose(adapted, plain.forward_features(x), atol=1e-4)  # the step changed the function
        merge(b)
        torch.testing.assert_close(b.forward_features(x), adapted, atol=1e-5, rtol=1e-5)
    assert all(type(blk.attn.qkv) is nn.Linear for blk in b.image_encoder.blocks)


def test_only_dora_trains_and_the_decoder_is_left_to_the_method():
    b, _, names = _adapted("in", prompt_decoder=True)
    trainable = {n for n, p in b.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("image_encoder.") for n in trainable)  # method=mapsam trains the decoder
    assert all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "magnitude") for n in trainable)
    assert all(".attn.qkv.q." in n or ".attn.qkv.v." in n for n in trainable)
    assert len(trainable) == 2 * 2 * 3  # 2 blocks x (q, v) x (A, B, m)
    assert names and all(n.startswith("image_encoder.") for n in names)


def test_bad_axis_is_named():
    with pytest.raises(ValueError, match="magnitude_axis='row'.*'out', 'in'"):
        DoRASAM(magnitude_axis="row")
