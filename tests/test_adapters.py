"""Adapters on a tiny timm ViT and a tiny SAM image encoder: invariants, merge, maths against independent code."""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest
import torch
from segment_anything.modeling import ImageEncoderViT
from torch import nn

from dgkit.adapters import (
    PEGO,
    SALT,
    AdapterLinear,
    AnnealedWeightDecay,
    DoRA,
    Freeze,
    LoRA,
    SoMA,
    SplitQKV,
    linear_names,
    merge,
    orthogonality_penalty,
    regularizers,
)
from dgkit.backbones import SmallCNN, TimmBackbone

pytestmark = pytest.mark.usefixtures("one_thread")


ADAPTERS = {
    "lora": lambda: LoRA(rank=2, alpha=4),
    "lora_qv": lambda: LoRA(rank=2, split_qkv=True, qkv_slices=["q", "v"]),
    "dora": lambda: DoRA(rank=2, alpha=2),
    "soma": lambda: SoMA(rank=2, alpha=2),
    "soma_principal": lambda: SoMA(rank=2, components="principal", start_block=0),
    "pego": lambda: PEGO(rank=2, num=3),
    "salt": lambda: SALT(rank=2, top_ratio=0.2),
}


def tiny_vit() -> nn.Module:
    """A 3-block timm ViT (24-d, 8 px patches on 16 px images) behind dgkit's backbone surface."""
    torch.manual_seed(0)
    kwargs = {"img_size": 16, "patch_size": 8, "embed_dim": 24, "depth": 3, "num_heads": 2}
    return TimmBackbone("vit_tiny_patch16_224", model_kwargs=kwargs).eval()


def tiny_sam() -> nn.Module:
    """A 2-block SAM image encoder (32-d, 8 px patches on 32 px images)."""
    torch.manual_seed(0)
    return ImageEncoderViT(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, out_chans=8, window_size=0
    ).eval()


MODELS = {"timm": (tiny_vit, (3, 3, 16, 16)), "sam": (tiny_sam, (2, 3, 32, 32))}


def _adapted(model_name: str, adapter_name: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    make, shape = MODELS[model_name]
    base = make()
    adapted = copy.deepcopy(base)
    ADAPTERS[adapter_name]().apply(adapted)
    return base, adapted, torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def _perturb_trainable(model: nn.Module) -> None:
    """Move every trainable parameter away from its init (LoRA's B = 0 would hide a wrong merge)."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("adapter_name", ADAPTERS)
def test_identity_at_init_and_merge(model_name, adapter_name):
    base, adapted, x = _adapted(model_name, adapter_name)
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), base(x), atol=1e-5, rtol=0)
        _perturb_trainable(adapted)
        y = adapted(x)
        assert not torch.allclose(y, base(x), atol=1e-3)  # the perturbed adapters do change the output
        merge(adapted)
        torch.testing.assert_close(adapted(x), y, atol=1e-5, rtol=0)
    assert set(adapted.state_dict()) == set(base.state_dict())  # plain layers again, qkv fused back
    assert all(type(m) is nn.Linear for n, m in adapted.named_modules() if n in set(linear_names(base)))


@pytest.mark.parametrize("adapter_name", ADAPTERS)
def test_only_adapter_parameters_change(adapter_name):
    base, adapted, x = _adapted("timm", adapter_name)
    adapted.train()
    before = {n: p.detach().clone() for n, p in adapted.named_parameters()}
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    # what may train: adapter factors, and for SoMA the adapted layers' biases (train_bias)
    allowed = {"soma": r"lora_|\.base\.bias$", "salt": r"lora_|sv_(scale|shift)$"}.get(adapter_name[:4], r"lora_")
    allowed = re.compile(allowed)
    assert trainable and all(allowed.search(n) for n in trainable)
    opt = torch.optim.SGD([p for p in adapted.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):  # two steps: with B = 0, A only gets a gradient once B has moved
        opt.zero_grad()
        (adapted(x).pow(2).sum() + (regularizers(adapted) or 0)).backward()
        opt.step()
    changed = {n for n, p in adapted.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable
    assert any("lora_B" in n for n in changed) and any("lora_A" in n for n in changed)


def test_freeze_trains_nothing():
    model = tiny_vit()
    Freeze().apply(model)
    assert not any(p.requires_grad for p in model.parameters())


def test_targets_on_timm_and_sam_names():
    timm_model, sam_model = tiny_vit(), tiny_sam()
    names = LoRA(rank=2).apply(timm_model)
    assert names == [f"model.blocks.{i}.{s}" for i in range(3) for s in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    names = LoRA(rank=2).apply(sam_model)
    assert names == [f"blocks.{i}.{s}" for i in range(2) for s in ("attn.qkv", "attn.proj", "mlp.lin1", "mlp.lin2")]
    names = PEGO(rank=2).apply(tiny_sam())
    assert names == [f"blocks.{i}.attn.qkv.{s}" for i in range(2) for s in "qv"]
    soma = tiny_vit()
    names = SoMA(rank=2).apply(soma)  # start_block null: one third of 3 blocks
    assert {int(n.split(".")[2]) for n in names} == {1, 2} and "model.blocks.1.attn.qkv.k" in names
    assert isinstance(soma.model.blocks[0].attn.qkv, nn.Linear)  # blocks before start_block are not split
    assert isinstance(soma.model.blocks[1].attn.qkv, SplitQKV)


def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"matches none of the 12 linear layers.*model\.blocks\.<i>\.attn\.qkv \(x3\)"):
        LoRA(rank=2, target=r"does_not_exist").apply(tiny_vit())
    with pytest.raises(ValueError, match=r"rank=40 exceeds min\(in, out\)=24 of model\.blocks\.0\.attn\.qkv"):
        LoRA(rank=40).apply(tiny_vit())
    with pytest.raises(ValueError, match="SmallCNN has no nn.Linear layers"):
        SoMA().apply(SmallCNN())
    with pytest.raises(ValueError, match="qkv_slices needs adapter.split_qkv=true"):
        LoRA(qkv_slices=["q"])
    with pytest.raises(ValueError, match="components='major'"):
        SoMA(components="major")


def _numpy_triplets(w: np.ndarray, r: int, minor: bool) -> tuple[np.ndarray, np.ndarray]:
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    idx = slice(len(s) - r, len(s)) if minor else slice(0, r)
    return (u[:, idx] * s[idx]) @ vt[idx], s[idx]


@pytest.mark.parametrize("components", ["minor", "principal"])
def test_soma_holds_the_chosen_singular_components(components):
    model = tiny_vit()
    pretrained = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    SoMA(rank=3, alpha=6, components=components, start_block=0).apply(model)
    layer = model.model.blocks[1].attn.qkv.k  # a split part: its SVD is the k block's own
    w_pre = pretrained["model.blocks.1.attn.qkv"][24:48].numpy()
    s = 6 / 3
    reconstructed = layer.base.weight + s * layer.lora_B @ layer.lora_A  # W_res + s B A
    torch.testing.assert_close(reconstructed, torch.from_numpy(w_pre), atol=1e-5, rtol=0)
    expected, sigma = _numpy_triplets(w_pre, 3, components == "minor")
    ba = (s * layer.lora_B @ layer.lora_A).detach().double().numpy()
    np.testing.assert_allclose(ba, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.svd(ba, compute_uv=False)[:3], sigma, atol=1e-5)
    fc2 = model.model.blocks[2].mlp.fc2
    expected, _ = _numpy_triplets(pretrained["model.blocks.2.mlp.fc2"].numpy(), 3, components == "minor")
    np.testing.assert_allclose((s * fc2.lora_B @ fc2.lora_A).detach().double().numpy(), expected, atol=1e-5)


def test_pego_penalty_by_hand():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    a = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]])  # A_1, A_2: (K=2, r=1, in=2)
    b = torch.tensor([[[1.0], [2.0]], [[1.0], [0.0]]])  # B_1, B_2: (K=2, out=2, r=1)
    # ΔW_1 = [[1, 0], [2, 0]], ΔW_2 = [[1, 1], [0, 0]]
    # W ΔW_1ᵀ = [[1, 2], [3, 6]] (12); W ΔW_2ᵀ = [[3, 0], [7, 0]] (10); ΔW_1 ΔW_2ᵀ = [[1, 0], [2, 0]] (3)
    assert orthogonality_penalty(w, a, b).item() == pytest.approx(25.0)
    # orthogonal factors: W spans e1, A_1 = e2, A_2 = e3, so every product vanishes
    w3 = torch.diag(torch.tensor([1.0, 0.0, 0.0]))
    a3 = torch.tensor([[[0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0]]])
    b3 = torch.tensor([[[1.0], [2.0], [3.0]], [[-1.0], [0.5], [2.0]]])
    assert orthogonality_penalty(w3, a3, b3).item() == 0.0


def test_pego_penalty_matches_naive_products_and_regularizers_sums_layers():
    model = tiny_vit()
    PEGO(rank=2, num=3, weight=0.5).apply(model)
    _perturb_trainable(model)
    total = 0.0
    for m in model.modules():
        if isinstance(m, AdapterLinear):
            w = m.base.weight.detach().double().numpy()
            deltas = [(m.lora_B[i] @ m.lora_A[i]).detach().double().numpy() for i in range(3)]
            total += sum(np.abs(w @ d.T).sum() for d in deltas)
            total += sum(np.abs(deltas[i] @ deltas[j].T).sum() for i in range(3) for j in range(i + 1, 3))
    assert regularizers(model).item() == pytest.approx(0.5 * total, rel=1e-5)


def test_dora_matches_hand_formula_with_detached_norm():
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    wrapper = nn.Sequential(copy.deepcopy(layer))
    DoRA(rank=2, alpha=4, target="0").apply(wrapper)
    dora = wrapper[0]
    with torch.no_grad():
        dora.lora_B["default"].weight.normal_()
        dora.lora_magnitude_vector["default"].weight.mul_(1.5)
    a = dora.lora_A["default"].weight.detach().clone().requires_grad_(True)
    b = dora.lora_B["default"].weight.detach().clone()
    m = dora.lora_magnitude_vector["default"].weight.detach().clone()
    x = torch.randn(4, 6)
    v = layer.weight + 2.0 * b @ a  # W + s B A, s = alpha / r
    w_new = m[:, None] * v / v.norm(dim=1, keepdim=True).detach()  # norm per output feature, detached
    expected = x @ w_new.T + layer.bias
    out = dora(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(dora.lora_A["default"].weight.grad, a.grad, atol=1e-5, rtol=1e-5)


def test_lora_matches_hand_formula():
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    wrapper = nn.Sequential(copy.deepcopy(layer))
    LoRA(rank=2, alpha=3, target="0").apply(wrapper)
    with torch.no_grad():
        wrapper[0].lora_B["default"].weight.normal_()
    a, b = wrapper[0].lora_A["default"].weight, wrapper[0].lora_B["default"].weight
    x = torch.randn(4, 6)
    torch.testing.assert_close(wrapper(x), layer(x) + 1.5 * (x @ a.T) @ b.T, atol=1e-6, rtol=1e-6)


def test_annealed_weight_decay_and_its_resume():
    p, q = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p], "weight_decay": 0.05}, {"params": [q], "weight_decay": 0.0}])
    trainer = type("T", (), {"max_steps": 10, "global_step": 0, "optimizers": [opt]})()
    callback = AnnealedWeightDecay(eta_min=1e-5)
    seen = []
    for step in (0, 5, 10):
        trainer.global_step = step
        callback.on_train_batch_start(trainer, None)
        seen.append(opt.param_groups[0]["weight_decay"])
    expected = [1e-5 + (0.05 - 1e-5) * (1 + math.cos(math.pi * t / 10)) / 2 for t in (0, 5, 10)]
    assert seen == pytest.approx(expected) and opt.param_groups[1]["weight_decay"] == 0.0  # wd 0 is not raised
    restored = torch.optim.AdamW([{"params": [p], "weight_decay": 0.05}, {"params": [q], "weight_decay": 0.0}])
    restored.load_state_dict(opt.state_dict())  # a resumed run: the group carries its annealed wd and wd_0
    trainer.optimizers, trainer.global_step = [restored], 5
    callback.on_train_batch_start(trainer, None)
    assert restored.param_groups[0]["weight_decay"] == pytest.approx(expected[1])


def test_salt_scales_top_singular_values_and_adapts_only_the_residual_basis():
    torch.manual_seed(3)
    layer = nn.Linear(10, 8)
    w = layer.weight.detach().double().numpy()
    u, s, vt = np.linalg.svd(w, full_matrices=False)  # independent float64 SVD
    model = nn.Sequential()
    model.add_module("proj", layer)
    SALT(rank=2, top_ratio=0.25, target="proj").apply(model)  # n = 8: r_top = 2, 6 residual directions
    salt = model.proj
    x = torch.randn(5, 10)
    with torch.no_grad():
        torch.testing.assert_close(salt(x), layer(x), atol=1e-6, rtol=0)  # output-preserving at init
        # the top values: σ' = ReLU(a σ + b), the second one driven below zero (clipped)
        salt.sv_scale.copy_(torch.tensor([1.5, 0.5]))
        salt.sv_shift.copy_(torch.tensor([0.1, -float(s[1])]))
        sigma = s.copy()
        sigma[:2] = np.maximum(np.array([1.5, 0.5]) * s[:2] + np.array([0.1, -s[1]]), 0)
        expected = (u * sigma) @ vt
        np.testing.assert_allclose(salt.merged().weight.double().numpy(), expected, atol=1e-5)
        reference = x.double().numpy() @ expected.T + layer.bias.double().numpy()
        np.testing.assert_allclose(salt(x).double().numpy(), reference, atol=1e-5)
        # the residual LoRA: a rank-2 update orthogonal to the top singular directions on both sides
        salt.sv_scale.fill_(1.0)
        salt.sv_shift.zero_()
        salt.lora_A.copy_(torch.randn(2, 6))
        delta = salt.merged().weight.double().numpy() - w
    assert np.linalg.matrix_rank(delta, tol=1e-5) == 2
    np.testing.assert_allclose(u[:, :2].T @ delta, 0, atol=1e-5)
    np.testing.assert_allclose(delta @ vt[:2].T, 0, atol=1e-5)
    assert "u_top" in salt.state_dict()  # the basis is saved, not recomputed at reload


def test_salt_penalty_and_bad_input():
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(6, 6))
    SALT(rank=2, top_ratio=0.5, reg_weight=0.5, target="proj").apply(model)
    with torch.no_grad():
        model.proj.sv_shift.copy_(torch.tensor([0.3, 0.4, 0.0]))
        model.proj.lora_A.fill_(0.1)
    xy = (model.proj.lora_B @ model.proj.lora_A).detach()
    assert regularizers(model).item() == pytest.approx(0.5 * (0.5 + xy.norm().item()), rel=1e-5)
    with pytest.raises(ValueError, match="residual singular directions"):
        SALT(rank=4, top_ratio=0.5, target="0").apply(nn.Sequential(nn.Linear(6, 6)))
    with pytest.raises(ValueError, match="top_ratio"):
        SALT(top_ratio=1.0)
