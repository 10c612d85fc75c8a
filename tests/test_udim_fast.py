"""scripts/bench_udim.py (issue 19, item 2): the variants it composes, the 'before' code it loads from git, and its
profile table's arithmetic. The optimised and finite-difference UDIM steps themselves are tested against float64
references in tests/test_sharpness_udim.py."""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _script("bench_udim")


def _args(**kwargs) -> argparse.Namespace:
    return argparse.Namespace(**{"exp": "digits_erm", "steps": 4, "overrides": [], **kwargs})


def test_variants_compose_the_intended_methods(tmp_path):
    cfgs = {v: bench._cfg(_args(), v, tmp_path / v) for v in bench.VARIANTS}
    assert cfgs["erm"].method._target_.endswith("ERM")
    assert cfgs["sam"].method._target_.endswith("Sharpness")
    assert cfgs["udim_exact"].method.input_gradient == "exact"
    assert cfgs["udim_fd"].method.input_gradient == "finite_difference"
    before = cfgs["udim_before"].method
    assert before._target_ == f"{bench.BEFORE_MODULE}.UDIM"
    assert not set(bench.NEW_KEYS) & set(before)  # the old class would reject them
    for v in bench.UDIMS:
        assert cfgs[v].method.warmup_steps == 0  # the UDIM step itself is timed, not the SAM warm-up
        assert cfgs[v].trainer.max_steps == 4
        assert cfgs[v].backbone._target_.endswith("SmallCNN") and cfgs[v].data.batch_size == 32


def test_before_is_the_exact_step_as_it_was(tmp_path):
    if subprocess.run(["git", "cat-file", "-e", bench.BEFORE], cwd=ROOT, capture_output=True).returncode != 0:
        pytest.skip(f"commit {bench.BEFORE[:10]} is not in this clone")
    bench.load_before(bench.BEFORE, tmp_path)
    old = sys.modules[bench.BEFORE_MODULE].UDIM
    params = inspect.signature(old.__init__).parameters
    assert "rho_x" in params and not set(bench.NEW_KEYS) & set(params)
    assert (tmp_path / f"{bench.BEFORE_MODULE}.py").read_text().count("z = self.backbone(torch.cat([x, x_adv]))") == 1


def test_op_table_orders_by_the_first_udim_and_sums_the_rest():
    ops = {
        "erm": {"aten::a": 1.0, "aten::b": 2.0, "aten::c": 4.0},
        "udim_before": {"aten::a": 10.0, "aten::b": 30.0, "aten::c": 20.0, "aten::d": 5.0},
    }
    lines = bench.op_table(ops, rows=2).splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:4]] == ["`aten::b`", "`aten::c`"]
    assert lines[4] == "| other aten operators | 1 | 15 |"  # erm: a; udim: a + d
    assert lines[5] == "| **all aten operators** | **7** | **65** |"
