"""Adapters through the composition root: resume, checkpoint reload and merge, export, penalties in every loop."""

from __future__ import annotations

import re

import pytest
import torch
from omegaconf import open_dict

from dgkit.adapters import SplitQKV, merge
from dgkit.backbones import TimmBackbone
from dgkit.compose import build
from dgkit.identity import hparams_id
from dgkit.labels import default_tag
from dgkit.methods.base import Method
from dgkit.methods.erm import ERM
from dgkit.run import train
from dgkit.utils.io import read_jsonl
from tests.conftest import CONF

pytestmark = pytest.mark.usefixtures("one_thread")


ADAPTERS = sorted(p.stem for p in (CONF / "adapter").glob("*.yaml"))


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_every_adapter_fits(adapter, tiny_cfg, tmp_path, caplog):
    with caplog.at_level("INFO", logger="dgkit.adapters"):
        train(tiny_cfg(f"adapter={adapter}"))
    assert (tmp_path / "run" / "done").exists()
    assert re.search(r"adapter .*backbone parameters trainable \(\d+\.\d\d%\)", caplog.text)  # the summary


SOMA = ["adapter=soma", "adapter.rank=2", "method.optimizer._target_=torch.optim.AdamW",
        "method.optimizer.weight_decay=0.05", "trainer.max_steps=6", "export_backbone=true"]  # fmt: skip


def test_soma_run_resumes_reloads_merges_and_exports(tiny_cfg, tmp_path, monkeypatch):
    calls, real = [], ERM.training_losses

    def killed_at_step_5(self, batch):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("killed")  # after the step-4 evaluation and checkpoint
        return real(self, batch)

    monkeypatch.setattr(ERM, "training_losses", killed_at_step_5)
    cfg = tiny_cfg(*SOMA)
    with pytest.raises(RuntimeError, match="killed"):
        train(cfg)
    train(cfg)  # the same command: rebuilds the adapters, continues from last.ckpt
    out = tmp_path / "run"
    assert len(calls) == 7 and [r["step"] for r in read_jsonl(out / "results.jsonl")] == [2, 4, 6]

    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    group = ckpt["optimizer_states"][0]["param_groups"][0]
    assert group["initial_weight_decay"] == 0.05 and 1e-5 < group["weight_decay"] < 0.05  # annealed, resumable

    _, method = build(cfg)  # a checkpoint reloads into the structure its config rebuilds
    fresh = {k: v.clone() for k, v in method.state_dict().items()}
    method.load_state_dict(ckpt["state_dict"])
    assert any(not torch.equal(fresh[k], v) for k, v in method.state_dict().items() if "lora_" in k)
    method.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        adapted = method(x)
        merge(method.backbone)
        torch.testing.assert_close(method(x), adapted, atol=1e-5, rtol=0)
    assert not any(isinstance(m, SplitQKV) for m in method.backbone.modules())
    plain = TimmBackbone("test_vit", model_kwargs={"img_size": 32}, weights=str(out / "backbone.safetensors")).eval()
    with torch.no_grad():  # the exported file is the merged last-step backbone, readable by backbone.weights=
        torch.testing.assert_close(plain(x), method.backbone(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["erm", "sharpness"])
def test_pego_penalty_is_trained_and_logged(method, tiny_cfg, monkeypatch):
    seen = []
    real = Method.on_before_optimizer_step

    def spy(self, optimizer):
        a = self.backbone.model.blocks[0].attn.qkv.q.lora_A
        before = None if a.grad is None else a.grad.clone()
        real(self, optimizer)
        seen.append((before, a.grad.clone()))

    monkeypatch.setattr(Method, "on_before_optimizer_step", spy)
    cfg = tiny_cfg("adapter=pego", f"method={method}", "trainer.max_steps=3", "adapter.weight=10")
    train(cfg)
    assert len(seen) == 3
    before, after = seen[-1]  # by step 3 B != 0: the penalty adds its own gradient to the objective's
    assert before is not None and not torch.allclose(before, after)


def test_full_fine_tuning_keeps_hparams_id(tiny_cfg):
    cfg = tiny_cfg()
    base = hparams_id(cfg)
    with open_dict(cfg):
        del cfg["adapter"]
    assert hparams_id(cfg) == base  # runs from before the adapter group keep their id
    assert hparams_id(tiny_cfg("adapter=lora")) != base


def test_default_tag_names_the_adapter(tiny_cfg):
    """Adapters sharing one objective must not land in one result-table row (which would select among them)."""
    assert default_tag(tiny_cfg()) == "ERM"
    assert default_tag(tiny_cfg("adapter=soma")) == "ERM+SoMA"
    assert default_tag(tiny_cfg("adapter=freeze")) == "ERM+Freeze"
