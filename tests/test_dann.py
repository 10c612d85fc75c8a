"""DANN (Ganin et al., JMLR 2016): reversal layer, schedules, gradient routing, DomainBed's alternating updates."""

from __future__ import annotations

import csv

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger
from torch import nn

from dgkit.compose import build
from dgkit.methods import DANN
from dgkit.methods.grl import adaptation_factor, annealed_lr_factor, grad_reverse
from dgkit.run import train
from dgkit.utils.io import read_jsonl

# tanh(x / 2) == 2 / (1 + e^{-x}) - 1, so the ramp at p is tanh(5 p) for γ = 10 (values from a calculator).
RAMP = {0.0: 0.0, 0.1: 0.46211715726000974, 0.25: 0.8482836399575129, 0.5: 0.9866142981514303, 1.0: 0.9999092042625951}


class _Features(nn.Module):
    """A 6 → 4 linear "backbone" with the uniform surface methods rely on."""

    num_features = 4

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))


def _dann(**kwargs) -> DANN:
    torch.manual_seed(0)
    return DANN(_Features(), num_classes=3, domains=["a", "b", "c"], test_domains=["c"], **kwargs)


def _batch() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    # "b" first: domain labels must follow source_domains, not the dict order
    return {d: (torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)) for d in ("b", "a")}


def test_reversal_is_identity_forward_and_negated_scaled_backward():
    x = torch.randn(3, 5, requires_grad=True)
    out = grad_reverse(x, 0.3)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()  # a copy, not a view
    incoming = torch.randn(3, 5)
    out.backward(incoming)
    assert torch.allclose(x.grad, -0.3 * incoming)


def test_schedules_match_the_formulas():
    for p, expected in RAMP.items():
        assert adaptation_factor(p, lambda_max=1.0, gamma=10.0) == pytest.approx(expected, abs=1e-12)
    assert adaptation_factor(0.1, lambda_max=2.0, gamma=10.0) == pytest.approx(0.9242343145200195)
    assert adaptation_factor(0.0) == 0.0 and adaptation_factor(1.0) > 0.9999
    assert annealed_lr_factor(0.0) == 1.0
    assert annealed_lr_factor(0.5, alpha=10.0, beta=0.75) == pytest.approx(0.26084743001221455)  # 6^-0.75


def test_lr_annealing_scheduler_follows_the_global_step():
    method = _dann(lr_anneal=True)
    method.trainer = pl.Trainer(max_steps=4, logger=False, enable_progress_bar=False)
    config = method.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(3):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # 1e-3 / (1 + 10 · k / 4)^0.75 for k = 0, 1, 2
    assert lrs == pytest.approx([1e-3, 1e-3 * 0.39079497139068015, 1e-3 * 0.26084743001221455])


def test_domain_labels_index_source_domains():
    assert _dann().domain_labels(_batch()).tolist() == [1] * 5 + [0] * 5


def test_grl_routes_reversed_discriminator_gradient_to_features_only():
    method = _dann()
    method.progress = lambda: 0.5  # λ = tanh(2.5)
    losses = method.training_losses(_batch())
    assert float(losses["lambda"]) == pytest.approx(RAMP[0.5])
    method.zero_grad()
    losses["loss"].backward()
    # independent computation without the reversal layer: features get ∂(CE - λ disc), the discriminator ∂disc
    x, y = method.concat(_batch())
    z = method.backbone(x)
    ce = F.cross_entropy(method.classifier(z), y)
    disc = F.cross_entropy(method.discriminator(z), method.domain_labels(_batch()))
    features = list(method.backbone.parameters())
    for p, g in zip(features, torch.autograd.grad(ce - RAMP[0.5] * disc, features, retain_graph=True)):
        assert torch.allclose(p.grad, g, atol=1e-6)
    heads = list(method.discriminator.parameters())
    for p, g in zip(heads, torch.autograd.grad(disc, heads)):
        assert torch.allclose(p.grad, g, atol=1e-6)
    assert float(losses["disc_acc"]) == pytest.approx(
        (method.discriminator(z).argmax(-1) == method.domain_labels(_batch())).float().mean().item()
    )


def test_gradient_penalty_matches_per_sample_input_gradients():
    method = _dann(variant="alternating", grad_penalty=0.5)
    z = torch.randn(6, 4, requires_grad=True)
    domain = torch.tensor([0, 1, 0, 1, 1, 0])
    loss, _ = method._discriminate(z, domain)

    def sample_ce(zi: torch.Tensor, di: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(method.discriminator(zi[None]), di[None])

    per_sample = torch.func.vmap(torch.func.grad(sample_ce))(z.detach(), domain)  # (B, D)
    expected = F.cross_entropy(method.discriminator(z), domain) + 0.5 * per_sample.pow(2).sum(1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def _fit(method: DANN, datamodule, **kwargs) -> pl.Trainer:
    """Fit 4 steps without evaluation or checkpoints (the run folder is tested through ``train``)."""
    trainer = pl.Trainer(
        max_steps=4, limit_val_batches=0, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", **kwargs,
    )  # fmt: skip
    trainer.fit(method, datamodule=datamodule)
    return trainer


def _logged(path) -> list[dict[str, str]]:
    """Rows of a CSV log that carry the discriminator accuracy."""
    with open(path) as f:
        return [r for r in csv.DictReader(f) if r.get("train/disc_acc")]


def test_grl_logs_discriminator_accuracy_and_lambda_from_global_step(tiny_cfg, tmp_path):
    datamodule, method = build(tiny_cfg("method=dann", "method.lambda_max=1.0"))  # RAMP is the lambda_max = 1 ramp
    _fit(method, datamodule, logger=CSVLogger(tmp_path, name="logs"), log_every_n_steps=1)
    rows = _logged(tmp_path / "logs" / "version_0" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    assert all(0.0 <= float(r["train/disc_acc"]) <= 1.0 for r in rows)
    lambdas = [float(r["train/lambda"]) for r in rows]  # p = global_step / max_steps
    assert lambdas == pytest.approx([RAMP[0.0], RAMP[0.25], RAMP[0.5], 0.9988944427261528], abs=1e-6)


def test_alternating_variant_trains_a_run(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        "method=dann", "method.variant=alternating", "method.grad_penalty=0.1", "logger=csv",
        "trainer.log_every_n_steps=1",
    )  # fmt: skip
    train(cfg)
    out = tmp_path / "run"
    assert [r["step"] for r in read_jsonl(out / "results.jsonl")] == [2, 4]  # max_steps=4 means 4 batches
    assert (out / "done").exists()
    rows = _logged(out / "logs" / "version_0" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]  # every step logs (steps done, as results.jsonl counts)


class _WhoStepped(pl.Callback):
    """Record, per training batch, which parameter groups changed."""

    def __init__(self) -> None:
        self.changed: list[set[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        changed = {n.split(".")[0] for n, p in pl_module.named_parameters() if not torch.equal(p, self.before[n])}
        self.changed.append(changed)


def test_alternating_steps_discriminator_then_generator_like_domainbed(tiny_cfg):
    overrides = ["method=dann", "method.variant=alternating", "method.d_steps_per_g=2"]
    datamodule, method = build(tiny_cfg(*overrides, "method.lr_d=1e-3", "method.lr_g=1e-3"))
    spy = _WhoStepped()
    trainer = _fit(method, datamodule, logger=False, callbacks=[spy])
    # DomainBed: update_count = 1, 2, 3, 4; a discriminator step when update_count % 3 < 2
    discriminator, generator = {"discriminator"}, {"backbone", "classifier"}
    assert spy.changed == [discriminator, generator, discriminator, discriminator]
    assert trainer.global_step == 4  # one optimiser step per batch


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"variant": "domainbed"}, "grl, alternating"),
        ({"lambda_max": -1.0}, "lambda_max"),
        ({"gamma": -0.5}, "gamma"),
        ({"variant": "alternating", "d_steps_per_g": 0}, "d_steps_per_g"),
        ({"variant": "alternating", "grad_penalty": -1.0}, "grad_penalty"),
        ({"mlp_depth": 1}, "mlp_depth"),
        ({"grad_penalty": 1.0}, "grad_penalty"),  # alternating-only option on grl
        ({"variant": "alternating", "lr_anneal": True}, "lr_anneal"),
    ],
)
def test_invalid_values_raise_naming_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        _dann(**kwargs)


def test_single_source_domain_fails_at_construction(tiny_cfg):
    with pytest.raises(ValueError, match="at least 2 source domains.*method=erm"):
        build(tiny_cfg("method=dann", "data.test_domains=[a,b]"))


@pytest.mark.parametrize("variant", ["grl", "alternating"])
def test_bss_copy_doubles_the_batch_with_domain_labels(variant, tiny_cfg):
    """Under +augment=bss both variants see the standardised copy, with its class and domain labels repeated."""
    _, method = build(tiny_cfg("method=dann", f"method.variant={variant}", "+augment=bss", "augment.bss.p=1"))
    x = torch.rand(6, 3, 16, 16)
    y, d = torch.arange(6) % 3, torch.tensor([0, 0, 0, 1, 1, 1])
    x2, y2, d2 = method.with_bss_copy(x, y, d)
    assert x2.shape == (12, 3, 16, 16)
    assert torch.equal(x2[:6], x) and not torch.equal(x2[6:], x)
    assert torch.equal(y2, torch.cat([y, y])) and torch.equal(d2, torch.cat([d, d]))
    batch = {"a": (x[:3], y[:3]), "b": (x[3:], y[3:])}
    losses = method.training_losses(batch) if variant == "grl" else method._discriminator_losses(batch)
    assert torch.isfinite(losses["disc"])
