"""Mixed precision (every objective, manual optimisation with the grad scaler), trainer.compile, channels_last."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import open_dict
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader

from dgkit.callbacks import FastPaths, to_channels_last
from dgkit.identity import hparams_id
from dgkit.methods.dann import DANN
from dgkit.methods.sharpness import Sharpness
from dgkit.methods.udim import UDIM
from dgkit.run import train
from dgkit.utils.io import read_jsonl
from tests.test_training import METHODS

DOMAINS = dict(num_classes=3, domains=["a", "b", "c"], test_domains=["c"])
MANUAL = {
    "sharpness": partial(Sharpness, rho=0.05),
    "udim": partial(UDIM, rho=0.05, warmup_steps=0),
    "dann_alternating": partial(DANN, variant="alternating", lr_g=0.5),  # step 1: the generator's (two optimisers)
}


def _sgd(params, lr, weight_decay=0.0, betas=None):
    """SGD in place of DANN's Adams: Adam's first step is about ``lr · sign(g)``, which turns a near-zero
    gradient's rounding into a full step; SGD's update is the gradient itself, comparable across precisions."""
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)


class _Tiny(nn.Module):
    """Linear -> BatchNorm -> tanh on 5-d inputs (autocast runs the linear layer in low precision)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.bn = nn.BatchNorm1d(6)
        self.num_features = 6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.bn(self.fc(x)))


def _step(name: str, precision: str) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.amp.GradScaler | None]:
    """One step of a manual-optimisation objective: (parameters before, after, the grad scaler if any).

    ``16-mixed`` runs on CPU through Lightning's own ``MixedPrecision`` plugin with a CPU grad scaler (Lightning
    only offers 16-mixed with CUDA from the ``precision`` flag): the scaler logic is the one CUDA runs.
    """
    torch.manual_seed(0)
    method = MANUAL[name](_Tiny(), optimizer=partial(torch.optim.SGD, lr=0.5), **DOMAINS)
    g = torch.Generator().manual_seed(1)
    batch = {d: (torch.randn(8, 5, generator=g), torch.arange(8) % 3) for d in ("a", "b")}
    before = [p.detach().clone() for p in method.parameters()]
    scaler = torch.amp.GradScaler("cpu") if precision == "16-mixed" else None
    flags = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler)]} if scaler else {"precision": precision}
    trainer = pl.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, **flags,
    )  # fmt: skip
    trainer.fit(method, train_dataloaders=DataLoader([batch], batch_size=None))
    assert trainer.global_step == 1
    return before, [p.detach().clone() for p in method.parameters()], scaler


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("name", sorted(MANUAL))
def test_manual_optimisation_step_matches_fp32(name, precision, one_thread, monkeypatch):
    monkeypatch.setattr(torch.optim, "Adam", _sgd)
    before, fp32, _ = _step(name, "32-true")
    before_mixed, mixed, scaler = _step(name, precision)
    assert all(torch.equal(a, b) for a, b in zip(before, before_mixed))
    update = torch.cat([(a - b).flatten() for a, b in zip(fp32, before)])
    update_mixed = torch.cat([(a - b).flatten() for a, b in zip(mixed, before)])
    assert update.norm() > 1e-2  # a real step, not a skipped one
    tol = 0.05 if precision == "bf16-mixed" else 0.01  # bf16 keeps 8 bits of mantissa, fp16 11
    assert (update_mixed - update).norm() / update.norm() < tol
    if scaler is not None:
        # the scaled loss only enters through manual_backward; the two passes of SAM (and UDIM's extra backward)
        # accumulate into one unscale + one scaler.step + one update per optimiser step
        assert scaler.get_scale() == 2.0**16 and int(scaler._growth_tracker) == 1


def test_16_mixed_skips_a_step_whose_first_pass_overflows(one_thread, monkeypatch):
    """An inf in the first pass's gradient gives a NaN ε; the weights are restored by copy, the second gradient
    is non-finite, and the scaler skips the step and lowers its scale (it does not step twice)."""
    real = Sharpness.sharpness_backward

    def overflow(self, x, y, grads):
        grads[0].fill_(float("inf"))
        return real(self, x, y, grads)

    monkeypatch.setattr(Sharpness, "sharpness_backward", overflow)
    before, after, scaler = _step("sharpness", "16-mixed")
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert scaler.get_scale() == 2.0**15


@pytest.mark.parametrize("method", METHODS)
def test_every_method_fits_in_bf16_mixed(method, tiny_cfg, tmp_path, one_thread):
    steps = ["trainer.max_steps=2", "trainer.precision=bf16-mixed", "data.batch_size=4"]
    train(tiny_cfg(f"method={method}", "backbone=small_cnn", *steps))
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "results.jsonl")] == [2]


def test_speed_options_leave_the_hparams_id_unchanged(tiny_cfg):
    default = tiny_cfg()
    fast = tiny_cfg("trainer.compile=true", "trainer.channels_last=true")
    older = copy.deepcopy(default)
    with open_dict(older):
        del older.trainer["compile"], older.trainer["channels_last"]  # configs written before the keys existed
    assert hparams_id(default) == hparams_id(fast) == hparams_id(older)
    assert hparams_id(default) != hparams_id(tiny_cfg("trainer.precision=bf16-mixed"))


def test_compile_trains_a_cnn_and_leaves_a_plain_backbone(tiny_cfg, tmp_path, one_thread, monkeypatch):
    compiled, modules = [], []
    real = FastPaths.setup

    def spy(self, trainer, pl_module, stage):
        real(self, trainer, pl_module, stage)
        compiled.append(pl_module.backbone._compiled_call_impl is not None)
        modules.append(pl_module)

    monkeypatch.setattr(FastPaths, "setup", spy)
    try:
        train(tiny_cfg("backbone=small_cnn", "trainer.compile=true", "trainer.max_steps=2"))
    except Exception as error:  # noqa: BLE001 (only a missing compiler toolchain is a reason to skip)
        if "inductor" in type(error).__module__ or "CppCompileError" in repr(error):
            pytest.skip(f"torch.compile cannot build kernels here: {error!r:.200}")
        raise
    assert compiled == [True]
    assert modules[0].backbone._compiled_call_impl is None  # uncompiled at teardown: to_inference copies it plainly
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "results.jsonl")] == [2]


def test_compile_refuses_double_backward_objectives(tiny_cfg):
    with pytest.raises(ValueError, match="double backward"):
        train(tiny_cfg("method=udim", "backbone=small_cnn", "trainer.compile=true"))


def test_channels_last_converts_image_batches_only():
    x, y, mask = torch.randn(2, 3, 4, 4), torch.tensor([0, 1]), torch.zeros(2, 4, 4, dtype=torch.long)
    out = to_channels_last({"a": (x, y), "b": [x, mask]})
    assert out["a"][0].is_contiguous(memory_format=torch.channels_last) and not out["a"][0].is_contiguous()
    assert torch.equal(out["a"][0], x) and out["a"][1] is y and out["b"][1] is mask and isinstance(out["b"], list)


def test_channels_last_learns_what_the_default_learns(tiny_cfg, tmp_path, one_thread):
    def weights(*overrides, out):
        train(tiny_cfg("backbone=small_cnn", "trainer.max_steps=2", *overrides, out=out))
        return torch.load(tmp_path / out / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]

    default = weights(out="default")
    fast = weights("trainer.channels_last=true", out="fast")
    assert any(v.is_contiguous(memory_format=torch.channels_last) and v.ndim == 4 and v.shape[-1] > 1
               for v in fast.values())  # fmt: skip
    for key, value in default.items():  # another summation order; Adam turns a ~0 gradient's rounding into up to
        torch.testing.assert_close(fast[key].contiguous(), value, rtol=1e-3, atol=1e-4)  # lr (1e-3): atol lr/10
