"""The sweep planner: Hydra's job count, the pair runs leave-one-domain-out needs, the probe's estimate."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dgkit.plan import describe, plan
from tests.conftest import ROOT, TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def test_job_count_equals_what_hydra_launches(tmp_path):
    sweep = ["data.test_domains=[a],[b]", "seed=0,1", "hparams_seed=range(0,2)"]
    planned = plan([*TINY, *sweep])
    assert len(planned.jobs) == 8
    cmd = [sys.executable, "train.py", "-m", *TINY, *sweep, "trainer.max_steps=1", "trainer.val_check_interval=1",
           f"hydra.sweep.dir={tmp_path}"]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(tmp_path.glob("*/run.json"))) == len(planned.jobs)


def test_leave_one_domain_out_pairs_are_listed_once_and_present_ones_counted():
    planned = plan([*TINY, "data.test_domains=[a],[b],[a,b]"])
    assert planned.domains == ["a", "b", "c"] and len(planned.single) == 2
    # a needs {a,b} and {a,c}; b needs {a,b} and {b,c}: three pairs, {a,b} already in the sweep
    assert planned.pairs_present == 1
    assert sorted(job[-1] for job in planned.pairs_needed) == ["data.test_domains=[a,c]", "data.test_domains=[b,c]"]
    text = describe(planned)
    assert "3 pair runs (1 in this sweep, 2 missing)" in text
    assert "'data.test_domains=[a,c],[b,c]'" in text


def test_probe_estimates_the_sweep(tmp_path):
    planned = plan([*TINY, "data.test_domains=[a],[b]"], probe_steps=3)
    assert planned.seconds_per_step > 0 and planned.seconds_per_evaluation > 0
    assert planned.steps_per_job == 4 and planned.evaluations_per_job == 2  # TINY: 4 steps, evaluation every 2
    expected = (planned.seconds_per_step * 4 + planned.seconds_per_evaluation * 2) * 2 / 3600
    assert planned.cpu_hours == pytest.approx(expected)


def test_pair_runs_of_a_cartesian_sweep_are_one_command():
    from dgkit.plan import pair_command

    needed = [
        [f"seed={s}", f"hparams_seed={h}", f"data.test_domains=[{p}]"]
        for s in (0, 1) for h in (0, 1, 2) for p in ("a,b", "a,c")
    ]  # fmt: skip
    assert pair_command(needed) == "python train.py -m 'seed=0,1' 'hparams_seed=0,1,2' 'data.test_domains=[a,b],[a,c]'"
    # not a product (seed 1 lacks draw 2): one command per combination, nothing invented
    partial = [job for job in needed if job[:2] != ["seed=1", "hparams_seed=2"]]
    lines = pair_command(partial).splitlines()
    assert len(lines) == 5 and all("'data.test_domains=[a,b],[a,c]'" in line for line in lines)


def test_held_out_domains_compose_once_per_data_override(monkeypatch):
    import dgkit.plan as plan_module

    calls = []
    real = plan_module.compose
    monkeypatch.setattr(plan_module, "compose", lambda *a, **k: calls.append(k["overrides"]) or real(*a, **k))
    jobs = plan_module.expand([*TINY, "data.test_domains=[a],[b]", "seed=0,1,2", "hparams_seed=range(0,3)"])
    held = plan_module.held_out_domains(jobs, ["a", "b", "c"])
    assert len(jobs) == 18 and len(calls) == 2
    assert sorted(set(held.values())) == [("a",), ("b",)]
