"""End-to-end runs on tiny data: every method config fits, records are written, resume continues."""

import json
import subprocess
import sys

import pytest

from dgkit.methods.erm import ERM
from dgkit.run import train
from dgkit.utils.io import read_jsonl
from tests.conftest import CONF, ROOT, TINY

SEGMENTATION_ONLY = {"mapsam", "sam_pretrain"}  # need SAM's decoder (and prompts): refuse classification (tested below)
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml") if p.stem not in SEGMENTATION_ONLY)


@pytest.mark.parametrize("backbone", ["test_vit", "small_cnn"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_fits(method, backbone, tiny_cfg, tmp_path):
    final = train(tiny_cfg(f"method={method}", f"backbone={backbone}"))
    out = tmp_path / "run"
    records = read_jsonl(out / "results.jsonl")
    assert [r["step"] for r in records] == [2, 4]
    keys = {f"acc/{d}/{s}" for d in "abc" for s in ("in", "out")}
    assert keys <= set(records[0])
    assert (out / "done").exists() and (out / "checkpoints" / "best.ckpt").exists()
    run = json.loads((out / "run.json").read_text())
    assert run["test_domains"] == ["c"] and run["dataset"] == "synthetic"
    best = max(records, key=lambda r: (r["acc/a/out"] + r["acc/b/out"]) / 2)
    assert final["step"] == best["step"] and final["test_score"]["c"] == best["acc/c/in"]


def test_segmentation_only_methods_refuse_classification(tiny_cfg):
    for method in sorted(SEGMENTATION_ONLY):
        with pytest.raises(ValueError, match=f"method={method}"):
            train(tiny_cfg(f"method={method}"))


def test_last_step_is_evaluated(tiny_cfg, tmp_path):
    train(tiny_cfg("trainer.max_steps=5", "trainer.val_check_interval=2"))
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "results.jsonl")] == [2, 4, 5]


def test_resume_continues_from_last_checkpoint(tiny_cfg, tmp_path, monkeypatch):
    calls = []
    real = ERM.training_losses

    def killed_at_step_5(self, batch):
        calls.append(1)
        if len(calls) == 5 and not resumed:
            raise RuntimeError("killed")  # the process dies after the step-4 evaluation and checkpoint
        return real(self, batch)

    monkeypatch.setattr(ERM, "training_losses", killed_at_step_5)
    out = tmp_path / "run"
    resumed = False
    with pytest.raises(RuntimeError, match="killed"):
        train(tiny_cfg("trainer.max_steps=6"))
    assert not (out / "done").exists()
    resumed, calls[:] = True, []
    train(tiny_cfg("trainer.max_steps=6"))  # the same command again
    assert len(calls) == 2  # steps 5 and 6 only: it continued from step 4
    assert [r["step"] for r in read_jsonl(out / "results.jsonl")] == [2, 4, 6]
    calls.clear()
    train(tiny_cfg("trainer.max_steps=6"))  # finished: skipped
    assert calls == []


def test_changed_config_is_not_resumed(tiny_cfg, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(tiny_cfg())
    with pytest.raises(ValueError, match="holds another run .config: .*resume=false"):
        train(tiny_cfg("method.optimizer.lr=0.5"))
    calls = []
    real = ERM.training_losses
    monkeypatch.setattr(ERM, "training_losses", lambda self, batch: calls.append(1) or real(self, batch))
    train(tiny_cfg("method.optimizer.lr=0.5", "resume=false"))  # explicitly start over
    assert len(calls) == 4 and [r["step"] for r in read_jsonl(out / "results.jsonl")] == [2, 4]


def test_hparams_id_ignores_where_data_lives(tiny_cfg):
    from dgkit.identity import hparams_id

    base = hparams_id(tiny_cfg())
    assert hparams_id(tiny_cfg("paths.datasets=/elsewhere")) == base
    assert hparams_id(tiny_cfg("seed=3", "data.test_domains=[a]")) == base
    assert hparams_id(tiny_cfg("method.optimizer.lr=0.1")) != base


def test_empty_source_validation_split_is_an_error(tiny_cfg):
    with pytest.raises(ValueError, match="empty 'out' split.*holdout_fraction"):
        train(tiny_cfg("data.holdout_fraction=0.0"))


def test_cli_multirun_skips_finished_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "-m", *TINY, "seed=0,1", f"hydra.sweep.dir={sweep}", "trainer.max_steps=2"]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    finals = sorted(sweep.glob("*/final.json"))
    assert len(finals) == 2
    stamps = [f.stat().st_mtime_ns for f in finals]
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "already finished" in second.stdout + second.stderr
    assert [f.stat().st_mtime_ns for f in finals] == stamps


@pytest.mark.parametrize("logger, pattern", [("csv", "logs/version_0/metrics.csv"), ("tensorboard", "logs/*/events.*")])
def test_loggers_write(logger, pattern, tiny_cfg, tmp_path):
    train(tiny_cfg(f"logger={logger}"))
    assert list((tmp_path / "run").glob(pattern))


def test_folder_benchmark_on_top_of_experiment(tmp_path):
    """`+exp=quickstart data=folder data.root=PATH backbone=test_vit` trains on a user's own tree."""
    import numpy as np
    from PIL import Image

    from tests.conftest import compose_cfg

    rng = np.random.default_rng(0)
    for d in ("winter", "summer", "night"):
        for c in ("cat", "dog"):
            (tmp_path / "tree" / d / c).mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
                    tmp_path / "tree" / d / c / f"{i}.jpg"
                )
    overrides = [
        "+exp=quickstart",
        "data=folder",
        f"data.root={tmp_path / 'tree'}",
        "data.test_domains=[night]",
        "data.image_size=32",
        "data.batch_size=4",
        "data.num_workers=0",
        "backbone=test_vit",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.enable_progress_bar=false",
        "logger=none",
        "print_summary=false",
    ]
    final = train(compose_cfg(overrides, tmp_path / "run"))
    assert final["dataset"] == "tree" and final["domains"] == ["night", "summer", "winter"]  # named by its root
    assert final["test_domains"] == ["night"] and set(final["scores"]) == {"night", "summer", "winter"}
