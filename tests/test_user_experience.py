"""What a user meets first: errors without tracebacks, progress that tells the time, defaults that fit."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dgkit.compose import build
from dgkit.config import default_workers
from dgkit.progress import format_seconds
from dgkit.run import train
from tests.conftest import ROOT, compose_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_config_error_is_one_message_before_any_model_is_built(tmp_path):
    cmd = [sys.executable, "train.py", "data=folder", f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert "error: the config leaves required values unset" in result.stderr
    assert "data.root: pass data.root=PATH" in result.stderr and "HYDRA_FULL_ERROR=1" in result.stderr
    assert "Traceback" not in output
    assert "adapter none" not in output  # nothing was built (the backbone logs its adapter summary when built)


def test_bar_off_logs_one_line_per_evaluation_with_time_left(tiny_cfg, caplog):
    with caplog.at_level(logging.INFO, logger="dgkit.progress"):
        train(tiny_cfg("trainer.max_steps=6"))
    lines = [r.getMessage() for r in caplog.records if r.name == "dgkit.progress"]
    assert [line.split(" | ")[0] for line in lines] == ["step 2/6", "step 4/6", "step 6/6"]
    assert all("elapsed" in line and "left" in line and "source validation acc" in line for line in lines)
    assert "held-out acc c" in lines[-1]


def test_format_seconds():
    assert [format_seconds(s) for s in (9, 75, 3725)] == ["9s", "1m15s", "1h02m"]


def test_folder_run_uses_the_backbones_native_size_and_warns_on_rescaling(tmp_path, caplog):
    rng = np.random.default_rng(0)
    for d in ("winter", "summer"):
        for c in ("cat", "dog"):
            (tmp_path / "tree" / d / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(
                    tmp_path / "tree" / d / c / f"{i}.png"
                )
    overrides = ["data=folder", f"data.root={tmp_path / 'tree'}", "data.test_domains=[winter]", "backbone=small_cnn"]
    with caplog.at_level(logging.WARNING):
        datamodule, method = build(compose_cfg(overrides, tmp_path / "run"))
    assert datamodule.data_config.input_size == (32, 32) == method.backbone.data_config.input_size
    assert "images are 96x96 px" in caplog.text and "32x32 px (3.0x)" in caplog.text


def test_loader_workers_follow_the_cpu_count():
    assert [default_workers(c) for c in (1, 2, 4, 8, 16, 64)] == [0, 0, 1, 2, 4, 4]
    cfg = compose_cfg(["data=folder", "data.root=x", "data.test_domains=[a]"])
    assert cfg.data.num_workers == default_workers()


def test_printed_checkpoint_paths_parse_in_evaluate(tmp_path):
    """Run folders are named after overrides (``+exp=quickstart``); evaluate.py takes such a path as printed."""
    import importlib.util

    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF

    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "scripts" / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    path = "outputs/runs/+exp=quickstart,seed=1/checkpoints/best.ckpt"
    argv = script.quote_paths([f"ckpt={path}", "tta=tent", f"data.root={tmp_path}/a=b"])
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=argv)
    assert cfg.ckpt == path and cfg.tta._target_.endswith("Tent") and cfg.data.root == f"{tmp_path}/a=b"


def test_tent_names_what_it_adapts_without_batchnorm_and_warns_on_episodic_use(caplog):
    from torch import nn

    from dgkit.backbones import SmallCNN
    from dgkit.tta import Tent

    with caplog.at_level(logging.WARNING, logger="dgkit.tta.norm"):
        tta = Tent().bind(SmallCNN(widths=(8, 8, 8, 8)), nn.Linear(8, 3))
    assert "no BatchNorm" in caplog.text and "features.2.weight" not in caplog.text
    assert "4 LayerNorm/GroupNorm layers (features.2, features.5, features.8, features.11)" in caplog.text
    assert tta.adapted == [f"features.{i}.{p}" for i in (2, 5, 8, 11) for p in ("weight", "bias")]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dgkit.tta.norm"):
        Tent(reset="per_batch")
    assert "Accuracy cannot change" in caplog.text


def test_script_flags_and_overrides_are_told_apart():
    from dgkit.utils.cli import split_overrides

    flags, overrides = split_overrides(["--methods", "erm", "dann", "trainer.max_steps=5", "--steps=3", "data=x"])
    assert flags == ["--methods", "erm", "dann", "--steps=3"] and overrides == ["trainer.max_steps=5", "data=x"]
    assert split_overrides(["--methods", "erm", "--", "seed=1"]) == (["--methods", "erm"], ["seed=1"])


def test_a_folder_dataset_is_named_by_its_root():
    cfg = compose_cfg(["data=folder", "data.root=/data/my_styles/", "data.test_domains=[a]"])
    assert cfg.data.name == "my_styles" and cfg.data.benchmark.name == "my_styles"
    assert compose_cfg(["data=pacs"]).data.name == "PACS"


def test_logger_steps_match_the_records(tiny_cfg, tmp_path):
    import csv

    from dgkit.utils.io import read_jsonl

    train(tiny_cfg("logger=csv"))
    rows = list(csv.DictReader((tmp_path / "run" / "logs" / "version_0" / "metrics.csv").open()))
    logged = [int(r["step"]) for r in rows if r.get("val/acc/source_out")]
    assert logged == [r["step"] for r in read_jsonl(tmp_path / "run" / "results.jsonl")] == [2, 4]


def test_trainer_strategy_is_a_plain_override():
    cfg = compose_cfg(["trainer.strategy=ddp"])
    assert cfg.trainer.strategy == "ddp"
