"""Sharpness-aware minimisation and UDIM: each piece against an independent float64 computation, then fits."""

from __future__ import annotations

import copy
from functools import partial

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from dgkit.methods.sharpness import Sharpness, frozen_running_stats, sharpness_epsilon
from dgkit.methods.udim import (
    UDIM,
    inconsistency_penalty,
    per_sample_and_deterministic,
    per_sample_head_grads,
    perturb_instances,
)
from dgkit.run import train
from dgkit.utils.io import read_jsonl

DOMAINS = dict(num_classes=3, domains=["a", "b", "c"], test_domains=["c"])


class _TinyBackbone(nn.Module):
    """Linear -> BatchNorm (or LayerNorm: per-sample) -> tanh on 5-d inputs: small enough for float64 references."""

    def __init__(self, norm: str = "batch") -> None:
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.bn = nn.BatchNorm1d(6) if norm == "batch" else nn.LayerNorm(6)
        self.num_features = 6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.bn(self.fc(x)))


def _method(cls=Sharpness, norm: str = "batch", **kwargs):
    torch.manual_seed(0)
    sgd = partial(torch.optim.SGD, lr=1.0)
    return cls(_TinyBackbone(norm), optimizer=sgd, **DOMAINS, **kwargs).double()


def _batch(n: int = 4) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return {d: (torch.randn(n, 5, generator=g, dtype=torch.float64), torch.arange(n) % 3) for d in ("a", "b")}


def _fit(method: pl.LightningModule, batch, steps: int = 1) -> None:
    """``steps`` optimisation steps on the same batch (float64, no validation, no files)."""
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", precision="64-true", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(method, train_dataloaders=DataLoader([batch] * steps, batch_size=None))  # batches as they are


def _grads(loss: torch.Tensor, model: nn.Module, **kwargs) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(model.parameters()), **kwargs))


def _sam_reference(ref: nn.Module, x: torch.Tensor, y: torch.Tensor, rho: float) -> list[torch.Tensor]:
    """∇L at θ + ρ g/||g|| on an explicitly perturbed copy (``ref`` itself takes one train-mode forward)."""
    g = _grads(F.cross_entropy(ref(x), y), ref)
    norm = torch.sqrt(sum(gi.pow(2).sum() for gi in g))
    moved = copy.deepcopy(ref)
    with torch.no_grad():
        for p, gi in zip(moved.parameters(), g):
            p.add_(rho * gi / norm)
    return _grads(F.cross_entropy(moved(x), y), moved)


def _bn_state(method: nn.Module) -> list[torch.Tensor]:
    bn = method.backbone.bn
    if not isinstance(bn, nn.BatchNorm1d):  # LayerNorm: no running statistics
        return []
    return [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()]


# ---- SAM utility -----------------------------------------------------------------------------------------
def test_epsilon_has_norm_rho_along_the_global_gradient():
    g = [torch.randn(3, 4, dtype=torch.float64), None, 100 * torch.randn(5, dtype=torch.float64)]
    eps = sharpness_epsilon(g, rho=0.3)
    flat_g = np.concatenate([g[0].numpy().ravel(), g[2].numpy().ravel()])
    flat_eps = np.concatenate([eps[0].numpy().ravel(), eps[2].numpy().ravel()])
    assert eps[1] is None
    np.testing.assert_allclose(flat_eps, 0.3 * flat_g / np.sqrt((flat_g**2).sum()), rtol=1e-12)  # one global norm
    assert np.linalg.norm(flat_eps) == pytest.approx(0.3)
    zero = sharpness_epsilon([torch.zeros(3)], rho=0.3)[0]
    assert torch.equal(zero, torch.zeros(3))  # ||g|| = 0: no perturbation, no NaN


def test_frozen_running_stats_restores_bn_buffers_but_uses_batch_statistics():
    bn = nn.Sequential(nn.BatchNorm1d(4), nn.BatchNorm1d(4, momentum=None)).train()
    bn(torch.randn(8, 4))
    before = [b.clone() for b in bn.buffers()]
    x = 3 + torch.randn(8, 4)
    with frozen_running_stats(bn):
        out = bn(x)
    assert all(torch.equal(a, b) for a, b in zip(before, bn.buffers()))
    assert out.mean().abs() < 1e-5  # still normalised with the batch statistics, not the running ones


def test_sharpness_step_is_minus_grad_at_theta_plus_eps_and_second_pass_leaves_bn_stats():
    rho = 0.1
    method, batch = _method(rho=rho), _batch()
    x, y = Sharpness.concat(batch)
    ref = copy.deepcopy(method)
    theta = [p.detach().clone() for p in ref.parameters()]
    g_sharp = _sam_reference(ref, x, y, rho)
    _fit(method, batch)
    for p, t, g in zip(method.parameters(), theta, g_sharp):  # SGD lr=1 from the restored θ
        torch.testing.assert_close(p.detach(), t - g, rtol=1e-10, atol=1e-12)
    for a, b in zip(_bn_state(method), _bn_state(ref)):  # one update: the first pass only
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sharpness_rejects_non_positive_rho():
    with pytest.raises(ValueError, match="rho=0"):
        _method(rho=0)


# ---- UDIM pieces ---------------------------------------------------------------------------------------
def test_per_sample_head_grads_equal_a_loop_of_single_sample_grads():
    torch.manual_seed(0)
    head = nn.Linear(6, 3).double()
    z = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 1, 0])
    got = per_sample_head_grads(head, z, y)
    loop = [_grads(F.cross_entropy(head(z[i : i + 1]), y[i : i + 1]), head, create_graph=True) for i in range(5)]
    torch.testing.assert_close(got["weight"], torch.stack([w for w, _ in loop]))
    torch.testing.assert_close(got["bias"], torch.stack([b for _, b in loop]))
    # differentiable like the loop (a penalty on them reaches the features and the head)
    dz = torch.autograd.grad(got["weight"].pow(2).sum() + got["bias"].pow(3).sum(), z)[0]
    ref = torch.autograd.grad(sum(w.pow(2).sum() + b.pow(3).sum() for w, b in loop), z)[0]
    torch.testing.assert_close(dz, ref)


@pytest.mark.parametrize("norm", ["per_sample", "batch_dim"])
def test_perturbed_inputs_are_rho_x_away_in_the_chosen_norm(norm):
    torch.manual_seed(0)
    x, d = torch.randn(4, 3, 5, 5, dtype=torch.float64), torch.randn(4, 3, 5, 5, dtype=torch.float64)
    delta = (perturb_instances(x, d, rho_x=2.5, norm=norm) - x).numpy()
    dn = d.numpy()
    if norm == "per_sample":
        norms = np.linalg.norm(delta.reshape(4, -1), axis=1)
        expected = 2.5 * dn / np.linalg.norm(dn.reshape(4, -1), axis=1)[:, None, None, None]
    else:  # every (c, h, w) position: unit norm across the batch
        norms = np.linalg.norm(delta, axis=0).ravel()
        expected = 2.5 * dn / np.linalg.norm(dn, axis=0, keepdims=True)
    np.testing.assert_allclose(norms, 2.5, rtol=1e-12)
    np.testing.assert_allclose(delta, expected, rtol=1e-10)
    other = np.linalg.norm(delta, axis=0) if norm == "per_sample" else np.linalg.norm(delta.reshape(4, -1), axis=1)
    assert not np.allclose(other, 2.5)  # the two choices really differ


def test_instance_gradient_matches_finite_differences_of_the_sam_surrogate():
    rho = 0.2
    method = _method(UDIM, rho=rho, warmup_steps=0)
    x, y = UDIM.concat(_batch())
    loss, grads, x_grad, _ = method.instance_gradient(x, y)

    def phi(xx: torch.Tensor) -> float:  # ℓ + ρ ||∇_θ ℓ||, first-order autograd only
        ell = F.cross_entropy(method(xx), y)
        return float((ell + rho * torch.sqrt(sum(g.pow(2).sum() for g in _grads(ell, method)))).detach())

    h = 1e-6
    for idx in [(0, 0), (3, 2), (5, 4), (7, 1)]:
        e = torch.zeros_like(x)
        e[idx] = h
        assert float(x_grad[idx]) == pytest.approx((phi(x + e) - phi(x - e)) / (2 * h), rel=1e-5, abs=1e-9)
    torch.testing.assert_close(grads[0], _grads(F.cross_entropy(method(x), y), method)[0])


def test_inconsistency_penalty_against_numpy():
    rng = np.random.default_rng(0)
    src = {"weight": rng.normal(size=(4, 3, 6)), "bias": rng.normal(size=(4, 3))}
    adv = {"weight": rng.normal(size=(5, 3, 6)), "bias": rng.normal(size=(5, 3))}
    var, norm = inconsistency_penalty(*({k: torch.from_numpy(v) for k, v in d.items()} for d in (src, adv)))
    gs = np.concatenate([src["weight"].reshape(4, -1), src["bias"]], axis=1)
    gt = np.concatenate([adv["weight"].reshape(5, -1), adv["bias"]], axis=1)
    v_s, v_t = ((gs - gs.mean(0)) ** 2).mean(0), ((gt - gs.mean(0)) ** 2).mean(0)
    m = (v_s + v_t) / 2
    assert float(var) == pytest.approx(0.5 * (((v_s - m) ** 2).mean() + ((v_t - m) ** 2).mean()), rel=1e-12)
    expected_norm = (adv["weight"] ** 2).sum((1, 2)).mean() / 18 + (adv["bias"] ** 2).sum(1).mean() / 3
    assert float(norm) == pytest.approx(expected_norm, rel=1e-12)


def _inconsistency_reference(ref: nn.Module, x, x_adv, y, sizes) -> torch.Tensor:
    """The inconsistency term by loops of single-sample autograd and explicit formulas."""
    z = ref.backbone(torch.cat([x, x_adv]))
    yy = torch.cat([y, y])
    per = [
        torch.cat(
            [
                g.flatten()
                for g in _grads(
                    F.cross_entropy(ref.classifier(z[i : i + 1]), yy[i : i + 1]), ref.classifier, create_graph=True
                )
            ]
        )
        for i in range(len(yy))
    ]
    total, start, n, k = 0.0, 0, len(y), ref.classifier.weight.numel()
    for size in sizes:
        gs, gt = torch.stack(per[start : start + size]), torch.stack(per[n + start : n + start + size])
        v_s, v_t = (gs - gs.mean(0)).pow(2).mean(0), (gt - gs.mean(0)).pow(2).mean(0)
        total = total + (v_s - v_t).pow(2).mean() / 4  # ½ Σ MSE(v_d, mean) = MSE(v_S, v_T) / 4
        total = total + gt[:, :k].pow(2).sum(1).mean() / k + gt[:, k:].pow(2).sum(1).mean() / (gt.shape[1] - k)
        start += size
    return total


def _udim_reference_update(method, batch, rho, rho_x, lambda_inc, direction):
    """``(θ, expected θ after one SGD(lr=1) UDIM step, BN state after the first forward)`` in float64, by
    explicit copies and loops; ``direction(ref, x, y)`` gives the ascent direction of the inputs."""
    x, y = UDIM.concat(batch)
    ref = copy.deepcopy(method)
    theta = [p.detach().clone() for p in ref.parameters()]
    dx = direction(ref, x, y)  # its train-mode forward at θ is the only BN running-stat update
    x_adv = x + rho_x * dx / dx.norm(dim=1, keepdim=True)
    bn_after_first = _bn_state(ref)
    g_sam = _sam_reference(copy.deepcopy(ref), x, y, rho)
    inc_model = copy.deepcopy(ref)
    g_inc = _grads(_inconsistency_reference(inc_model, x, x_adv, y, [4, 4]), inc_model)
    expected = [t - gs - lambda_inc * gi for t, gs, gi in zip(theta, g_sam, g_inc)]
    return expected, bn_after_first


def _exact_direction(rho):
    def direction(ref, x, y):  # ∇_x (ℓ + ρ ||∇_θ ℓ||) by double backward on the reference copy
        x_in = x.clone().requires_grad_(True)
        ell = F.cross_entropy(ref(x_in), y)
        g = _grads(ell, ref, create_graph=True)
        return torch.autograd.grad(ell + rho * torch.sqrt(sum(gi.pow(2).sum() for gi in g)), x_in)[0]

    return direction


def _assert_step(method, batch, expected, bn_after_first):
    _fit(method, batch)
    for p, e in zip(method.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-9, atol=1e-11)
    for a, b in zip(_bn_state(method), bn_after_first, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("norm", ["batch", "layer"])  # layer: step 4 reuses step 1's source features
@pytest.mark.parametrize("lambda_inc", [0.0, 0.7])
def test_udim_step_is_minus_sam_grad_minus_lambda_inconsistency_grad(lambda_inc, norm):
    rho, rho_x = 0.1, 0.5
    kwargs = dict(rho=rho, rho_x=rho_x, lambda_inc=lambda_inc, warmup_steps=0, perturb_norm="per_sample")
    method, batch = _method(UDIM, norm=norm, **kwargs), _batch()
    expected, bn = _udim_reference_update(method, batch, rho, rho_x, lambda_inc, _exact_direction(rho))
    _assert_step(method, batch, expected, bn)


def _fd_direction(rho, step):
    """``∇_x ℓ(θ) + (ρ / r) (∇_x ℓ(θ + r ĝ) - ∇_x ℓ(θ))`` on explicit copies (``step=None``: ``r = ρ``)."""
    r = rho if step is None else step

    def direction(ref, x, y):
        x_in = x.clone().requires_grad_(True)
        g_all = torch.autograd.grad(F.cross_entropy(ref(x_in), y), [*ref.parameters(), x_in])
        g, gx0 = g_all[:-1], g_all[-1]
        norm = torch.sqrt(sum(gi.pow(2).sum() for gi in g))
        moved = copy.deepcopy(ref)
        with torch.no_grad():
            for p, gi in zip(moved.parameters(), g):
                p.add_(r * gi / norm)
        x_r = x.clone().requires_grad_(True)
        gx_r = torch.autograd.grad(F.cross_entropy(moved(x_r), y), x_r)[0]
        return gx0 + (rho / r) * (gx_r - gx0)

    return direction


@pytest.mark.parametrize("norm", ["batch", "layer"])
@pytest.mark.parametrize("fd_step", [None, 0.03])
def test_udim_finite_difference_step_equals_its_float64_reference(fd_step, norm):
    rho, rho_x, lambda_inc = 0.1, 0.5, 0.7
    kwargs = dict(rho=rho, rho_x=rho_x, lambda_inc=lambda_inc, warmup_steps=0, perturb_norm="per_sample")
    method = _method(UDIM, norm=norm, input_gradient="finite_difference", fd_step=fd_step, **kwargs)
    batch = _batch()
    expected, bn = _udim_reference_update(method, batch, rho, rho_x, lambda_inc, _fd_direction(rho, fd_step))
    _assert_step(method, batch, expected, bn)


def test_finite_difference_direction_tends_to_the_exact_one_and_differs_at_r_equal_rho():
    rho = 0.2
    method = _method(UDIM, rho=rho, warmup_steps=0)
    x, y = UDIM.concat(_batch())
    exact = method.instance_gradient(x, y)[2]
    _, grads, gx0, _ = method.source_gradient(x, y, input_grad=True)

    def error(r: float) -> float:
        fd = gx0 + (rho / r) * (method.input_gradient_at(x, y, grads, r) - gx0)
        return float((fd - exact).norm() / exact.norm())

    errors = [error(r) for r in (rho, 1e-2, 1e-4)]
    assert errors[2] < 1e-4 < errors[1] / 10  # first order in r: 100x smaller step, about 100x smaller error
    assert errors[2] < errors[1] / 30
    assert errors[0] > 10 * errors[1]  # r = ρ (fd_step=null) is another direction, not a rounding of the exact one


@pytest.mark.parametrize(
    "norm, input_gradient, rows",
    [
        ("batch", "exact", [8, 8, 16]),  # batch statistics: step 4 forwards cat(x, x̃)
        ("layer", "exact", [8, 8, 8]),  # per-sample: step 4 forwards x̃ only, x's features come from step 1
        ("layer", "finite_difference", [8, 8, 8]),  # and r = ρ adds no pass to SAM's two
    ],
)
def test_udim_forwards_the_source_half_once_when_the_backbone_is_per_sample(norm, input_gradient, rows):
    method = _method(UDIM, norm=norm, input_gradient=input_gradient, warmup_steps=0)
    seen: list[int] = []
    method.backbone.register_forward_hook(lambda m, args, out: seen.append(len(args[0])))
    _fit(method, _batch())
    assert seen == rows


def test_per_sample_and_deterministic():
    gn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.LayerNorm(2), nn.Dropout(0.0)).train()
    assert per_sample_and_deterministic(gn)
    bn = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    assert not per_sample_and_deterministic(bn.train())
    assert per_sample_and_deterministic(bn.eval())  # running statistics: per sample
    assert not per_sample_and_deterministic(nn.BatchNorm1d(3, track_running_stats=False).eval())
    drop = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1))
    assert not per_sample_and_deterministic(drop.train())
    assert per_sample_and_deterministic(drop.eval())


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"rho": -0.1}, "rho="), ({"rho_x": 0.0}, "rho_x="), ({"lambda_inc": -1.0}, "lambda_inc="),
        ({"perturb_norm": "pixel"}, "perturb_norm="), ({"warmup_steps": -1}, "warmup_steps="),
        ({"warmup_fraction": 1.5}, "warmup_fraction="), ({"input_gradient": "hvp"}, "input_gradient="),
        ({"input_gradient": "finite_difference", "fd_step": 0.0}, "fd_step="), ({"fd_step": 0.01}, "fd_step="),
    ],
)  # fmt: skip
def test_udim_rejects_bad_values(kwargs, key):
    with pytest.raises(ValueError, match=key):
        _method(UDIM, **kwargs)


def test_udim_refuses_batch_styles_standardization():
    method = _method(UDIM)
    method.bss = object()  # what the composition root attaches under +augment=bss
    with pytest.raises(ValueError, match="augment.bss"):
        method.on_fit_start()


# ---- end to end ----------------------------------------------------------------------------------------
def _count_udim_steps(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = UDIM.inconsistency
    monkeypatch.setattr(UDIM, "inconsistency", lambda self, *a: calls.append(self.global_step) or real(self, *a))
    return calls


@pytest.mark.parametrize("kwargs", [{"warmup_steps": 2}, {"warmup_fraction": 0.5}, {"warmup_fraction": 0.6}])
def test_udim_starts_after_the_sam_warmup(kwargs, monkeypatch):
    calls = _count_udim_steps(monkeypatch)
    _fit(_method(UDIM, **kwargs), _batch(), steps=4)
    assert calls == [2, 3]  # steps 1-2 are SAM warm-up; steps 3-4 (global_step 2, 3 before stepping) UDIM


def test_udim_fits(tiny_cfg, tmp_path, monkeypatch):
    calls = _count_udim_steps(monkeypatch)
    train(tiny_cfg("method=udim", "method.warmup_steps=2", "method.perturb_norm=per_sample"))  # test_vit
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "results.jsonl")] == [2, 4]
    assert calls == [2, 3]


def test_sharpness_fits_and_steps_its_scheduler(tiny_cfg, tmp_path):
    sched = "method.scheduler={_target_:torch.optim.lr_scheduler.StepLR,_partial_:true,step_size:1,gamma:0.5}"
    train(tiny_cfg("method=sharpness", sched))
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "results.jsonl")] == [2, 4]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 0.5**4)
