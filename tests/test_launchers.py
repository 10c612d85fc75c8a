"""Sweeps through Hydra's launcher plugins: a relaunched sweep runs only its missing jobs and resumes a killed one
(joblib and submitit's local executor, which runs the Slurm launcher's code path without Slurm), the dgkit Slurm
preset, and DDP inside a multirun (``ddp`` switched to ``ddp_spawn``: the ranks split the data, the gradients are
averaged, the run is written once)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dgkit.run import train
from dgkit.utils.io import read_jsonl
from tests.conftest import ROOT, TINY, compose_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

LAUNCHERS = {
    "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    "submitit_local": ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5"],
}


def _sweep(tmp_path: Path, *overrides: str, kill_when=None, timeout: float = 240) -> tuple[int | None, str]:
    """Run ``train.py -m`` (tiny runs, one thread each) into ``tmp_path/sweep``; ``kill_when(sweep_dir)`` true:
    SIGKILL the whole process group at once (a node lost mid-sweep). Returns (exit status or None, output)."""
    log = tmp_path / f"launch{len(list(tmp_path.glob('launch*.log')))}.log"
    cmd = [sys.executable, "train.py", "-m", *TINY, "threads=1", f"paths.datasets={tmp_path / 'datasets'}",
           f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if kill_when is not None and kill_when(tmp_path / "sweep"):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return None, log.read_text()
            time.sleep(0.05)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"the sweep did not end in {timeout} s:\n{log.read_text()[-3000:]}")
    return proc.returncode, log.read_text()


def _jobs(sweep: Path) -> dict[str, Path]:
    """The started job folders of the sweep by their ``trainer.max_steps`` (4: the short job, 24: the long one)."""
    started = [p for p in sweep.glob("*/run.json")] if sweep.exists() else []
    return {str(json.loads(p.read_text())["max_steps"]): p.parent for p in started}


def _short_done_long_running(sweep: Path) -> bool:
    jobs = _jobs(sweep)
    if set(jobs) != {"4", "24"}:
        return False
    long = jobs["24"]
    return (
        (jobs["4"] / "done").exists() and (long / "checkpoints" / "last.ckpt").exists() and not (long / "done").exists()
    )


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_a_killed_sweep_relaunched_runs_only_what_is_missing(tmp_path, launcher):
    pytest.importorskip({"joblib": "hydra_plugins.hydra_joblib_launcher", "submitit_local": "submitit"}[launcher])
    sweep_args = [*LAUNCHERS[launcher], "trainer.max_steps=4,24"]
    status, output = _sweep(tmp_path, *sweep_args, kill_when=_short_done_long_running)
    assert status is None, f"the sweep ended before it could be killed mid-way:\n{output[-3000:]}"
    jobs = _jobs(tmp_path / "sweep")
    short_done = (jobs["4"] / "done").stat().st_mtime_ns
    interrupted = read_jsonl(jobs["24"] / "results.jsonl")
    assert interrupted and interrupted[-1]["step"] < 24  # the long job was killed part-way, after a checkpoint
    logs = {k: (p / "train.log").read_text() for k, p in jobs.items()}

    status, output = _sweep(tmp_path, *sweep_args)
    assert status == 0, output[-3000:]
    new = {k: (p / "train.log").read_text()[len(logs[k]) :] for k, p in jobs.items()}  # this launch's lines
    # the finished job is skipped (its outcome untouched), the killed one resumes from last.ckpt and finishes
    assert "already finished" in new["4"] and "step " not in new["4"]
    assert (jobs["4"] / "done").stat().st_mtime_ns == short_done
    assert "resuming from" in new["24"] and "last.ckpt" in new["24"] and (jobs["24"] / "done").exists()
    trained = sorted(k for k, text in new.items() if "dgkit.progress" in text)
    assert trained == ["24"]  # one of the two jobs ran
    records = read_jsonl(jobs["24"] / "results.jsonl")
    assert [r["step"] for r in records] == list(range(2, 25, 2))  # every evaluation once
    assert records[: len(interrupted)] == interrupted  # exact resume: the killed attempt's records again
    first = int(re.search(r"step (\d+)/24", new["24"]).group(1))
    assert first > 2 and first >= interrupted[-1]["step"]  # it continued from its checkpoint, not from step 0


def test_the_slurm_preset_extends_submitits_launcher():
    """``hydra/launcher=slurm`` (conf/hydra/launcher/slurm.yaml) is submitit's Slurm launcher with dgkit's keys."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(
            "train", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 1, 120)
    assert launcher.max_num_timeout > 0  # a job that hits its time limit is requeued and resumes from last.ckpt


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def test_ddp_inside_a_multirun_splits_the_data_and_writes_once(tmp_path):
    """``-m trainer.devices=2 trainer.strategy=ddp`` on CPU: dgkit switches to ``ddp_spawn`` (``ddp`` would relaunch
    the sweep) and says so. Two processes of batch B, gradients averaged, equal one process of batch 2B on the same
    stream (the ranks took complementary halves), not one of batch B (what both ranks seeing the same data gives)."""
    status, output = _sweep(tmp_path, "trainer.devices=2", "trainer.strategy=ddp", "seed=0")
    assert status == 0, output[-3000:]
    (job,) = [p for p in (tmp_path / "sweep").iterdir() if p.is_dir()]
    assert "using ddp_spawn instead" in output
    assert [r["step"] for r in read_jsonl(job / "results.jsonl")] == [2, 4] and (job / "done").exists()
    assert json.loads((job / "run.json").read_text())["devices"] == "2x1"
    reference = [*TINY, f"paths.datasets={tmp_path / 'datasets'}", "threads=1"]
    train(compose_cfg([*reference, "data.batch_size=16"], tmp_path / "one_process_2b"))
    train(compose_cfg(reference, tmp_path / "one_process_b"))
    ddp, twice, same = _weights(job), _weights(tmp_path / "one_process_2b"), _weights(tmp_path / "one_process_b")
    assert ddp.keys() == twice.keys()
    assert max((ddp[k] - twice[k]).abs().max().item() for k in ddp) < 1e-4
    assert max((ddp[k] - same[k]).abs().max().item() for k in ddp) > 1e-3
    ddp_records = read_jsonl(job / "results.jsonl")
    assert ddp_records == read_jsonl(tmp_path / "one_process_2b" / "results.jsonl")  # synchronised metrics


def test_optuna_maximises_training_domain_validation(tmp_path):
    """``hydra/sweeper=optuna_source_val``: every trial's value is its source validation score (recomputed here
    from its records: the best mean source ``out`` accuracy), and the study's best is the trial that maximises it."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    import yaml

    lr = "method.optimizer.lr=tag(log, interval(1e-4, 1e-1))"
    status, output = _sweep(tmp_path, "hydra/sweeper=optuna_source_val", "hydra.sweeper.n_trials=3", lr)
    assert status == 0, output[-3000:]
    scores = {}
    for run in (tmp_path / "sweep").glob("*/run.json"):
        records = read_jsonl(run.parent / "results.jsonl")
        source_val = max((r["acc/a/out"] + r["acc/b/out"]) / 2 for r in records)  # held out: c
        lr_value = yaml.safe_load((run.parent / "config.yaml").read_text())["method"]["optimizer"]["lr"]
        scores[lr_value] = source_val
        assert json.loads((run.parent / "final.json").read_text())["val_score"] == pytest.approx(source_val)
    assert len(scores) == 3
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(scores.values()))
    assert scores[best["best_params"]["method.optimizer.lr"]] == pytest.approx(max(scores.values()))
