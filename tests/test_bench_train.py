"""scripts/bench_train.py compares loops of the same length: every loop runs ``--steps`` steps, even when one
pass over the data is shorter (issue 19, item 4: a ZeroDivisionError, or different step counts compared)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from torch import nn

from tests.conftest import ROOT


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


bench = _script("bench_train")


class _FinitePass:
    """A datamodule whose training loader is one pass of ``batches`` batches (2 domains × 4 images of 8 px)."""

    def __init__(self, batches: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.batches = [
            ({d: (torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)) for d in "ab"}, 0, 0)
            for _ in range(batches)
        ]
        self.passes = 0

    def train_dataloader(self) -> list:
        self.passes += 1
        return list(self.batches)


class _Method(nn.Sequential):
    """A linear classifier with dgkit's ``optimizer_factory`` surface."""

    def __init__(self) -> None:
        super().__init__(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
        self.optimizer_factory = lambda params: torch.optim.SGD(params, lr=0.1)


def test_take_cycles_a_short_loader_to_exactly_the_steps() -> None:
    assert list(bench.take(lambda: range(3), 8)) == [0, 1, 2, 0, 1, 2, 0, 1]
    assert list(bench.take(lambda: range(5), 2)) == [0, 1]
    with pytest.raises(ValueError, match="no batches"):
        list(bench.take(lambda: [], 3))


def test_loops_over_a_pass_shorter_than_steps_run_every_step() -> None:
    """The old loops stopped after one pass (3 steps here): 2 warm-up steps left nothing to time."""
    data = _FinitePass(batches=3)
    plain = bench.plain_loop(data, _Method(), steps=12, warmup=2)
    loader = bench.data_loop(data, steps=12, warmup=2)
    assert plain.steps == loader.steps == 12
    assert plain.rate > 0 and loader.rate > 0
    assert data.passes == 8  # 4 passes of 3 batches per loop


def test_timing_and_step_count_checks() -> None:
    assert bench.timing([0.0, 1.0, 2.0, 4.0], warmup=1) == bench.LoopTiming(4, 2 / 3)
    with pytest.raises(ValueError, match="need at least 4"):
        bench.timing([0.0, 1.0, 2.0], warmup=2)
    same = {"dgkit": [bench.LoopTiming(6, 1.0)] * 2, "plain": [bench.LoopTiming(6, 2.0)]}
    assert bench.same_steps(same) == 6
    with pytest.raises(RuntimeError, match="different numbers of steps"):
        bench.same_steps({**same, "data": [bench.LoopTiming(3, 9.0)]})


def test_main_with_batches_larger_than_a_pass(tmp_path, capsys) -> None:
    """The issue's crash case in small: every per-domain batch (64) is longer than its domain's pass (~36)."""
    threads = torch.get_num_threads()
    try:
        timings = bench.main(
            ["--steps", "5", "--warmup", "1", "--repeats", "1", "data=synthetic", "data.batch_size=64"]
            + ["data.test_domains=[c]", "backbone=small_cnn_lite", "trainer.enable_progress_bar=false", "logger=none"]
        )
    finally:
        torch.set_num_threads(threads)
    assert {t.steps for ts in timings.values() for t in ts} == {5}
    assert "ratio dgkit / plain" in capsys.readouterr().out


ratios = _script("bench_ratios")


def test_compare_reports_drops_beyond_the_tolerance_only() -> None:
    baseline = {"dgkit_vs_plain": 1.0, "loader_vs_model": 10.0, "dann_vs_erm": 0.9, "gone_vs_erm": 0.5}
    current = {"dgkit_vs_plain": 0.84, "loader_vs_model": 8.6, "dann_vs_erm": 1.2, "new_vs_erm": 0.1}
    changes = {c.name: c for c in ratios.compare(current, baseline, tolerance=0.15)}
    assert list(changes) == ["dgkit_vs_plain", "loader_vs_model", "dann_vs_erm", "new_vs_erm", "gone_vs_erm"]
    assert [n for n, c in changes.items() if c.regression] == ["dgkit_vs_plain"]  # -16 %; -14 % is noise
    assert changes["dann_vs_erm"].relative == pytest.approx(1 / 3)  # faster: never a regression
    assert changes["new_vs_erm"].baseline is None and changes["gone_vs_erm"].current is None
    assert changes["gone_vs_erm"].relative is None
    assert not any(c.regression for c in ratios.compare(current, {}))
    assert "**dropped > 15 %**" in ratios.table(list(changes.values()), 0.15)
    with pytest.raises(ValueError, match="tolerance"):
        ratios.compare(current, baseline, tolerance=1.5)
    config = {"exp": "quickstart", "steps": 12, "warmup": 4, "threads": 1, "overrides": ["data.batch_size=8"]}
    assert ratios.same_setting(config, {**config, "repeats": 5, "methods": ["erm"]})
    assert not ratios.same_setting(config, {**config, "overrides": ["data.batch_size=32"]})


def test_ratios_read_higher_as_faster() -> None:
    loops = {
        "dgkit": [bench.LoopTiming(6, 3.0), bench.LoopTiming(6, 5.0)],  # median 4
        "plain": [bench.LoopTiming(6, 5.0)],
        "data": [bench.LoopTiming(6, 50.0)],
    }
    seconds = {"erm": [0.1, 0.2, 0.3], "sharpness": [0.4, 0.4]}
    assert ratios.ratios(loops, seconds) == pytest.approx(
        {"dgkit_vs_plain": 0.8, "loader_vs_model": 10.0, "sharpness_vs_erm": 0.5}
    )
