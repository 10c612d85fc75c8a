"""scripts/bench_domainbed.py's command line and arithmetic, without DomainBed (issue 19, item 4).

The comparison itself needs a DomainBed checkout (``--domainbed PATH``) and minutes of training; these checks
cover what runs before and after it: the refusals, the overrides of the dgkit side and the per-step figures.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.conftest import ROOT


def _script():
    spec = importlib.util.spec_from_file_location("bench_domainbed_script", ROOT / "scripts" / "bench_domainbed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _script()


def _error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_without_domainbed_it_names_the_flag_and_where_to_get_it(capsys) -> None:
    err = _error(["--sources", "3"], capsys)
    assert "--domainbed PATH is required" in err
    assert "https://github.com/facebookresearch/DomainBed" in err


def test_a_folder_without_domainbed_is_refused(tmp_path, capsys) -> None:
    err = _error(["--domainbed", str(tmp_path)], capsys)
    assert f"--domainbed {tmp_path}: no domainbed/algorithms.py there" in err


@pytest.fixture
def checkout(tmp_path):
    """A folder shaped like a DomainBed checkout (only the file the script looks for)."""
    (tmp_path / "domainbed").mkdir()
    (tmp_path / "domainbed" / "algorithms.py").write_text("")
    return tmp_path


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sources", "3,6"], "each count must be 1 to 5"),
        (["--sources", "0"], "each count must be 1 to 5"),
        (["--sources", "three"], "give comma-separated integers"),
        (["--arms", "dgkit,fast"], "unknown ['fast']; choose from ['domainbed', 'dgkit'"),
        (["--steps", "6", "--warmup", "5"], "--steps=6, --warmup=5: need --warmup >= 1 and --steps >= --warmup + 2"),
        (["--repeats", "0"], "--repeats=0, --batch=64: both must be >= 1"),
    ],
)
def test_bad_flags_are_named(argv, message, checkout, capsys) -> None:
    assert message in _error(["--domainbed", str(checkout), *argv], capsys)


def test_parsed_flags_and_overrides(checkout) -> None:
    args, extra = bench.parse_with_overrides(
        bench.parser(), ["--domainbed", str(checkout), "--sources", "5,3", "--arms", "dgkit,domainbed", "seed=1"]
    )
    assert (args.sources, args.arms, extra) == ([5, 3], ["dgkit", "domainbed"], ["seed=1"])
    overrides = bench.dgkit_overrides(3, args, ROOT / "x", extra)
    assert "data.test_domains=[45,60,75]" in overrides  # sources 0, 15, 30
    assert "data.test_domains=[15,30,45,60,75]" in bench.dgkit_overrides(1, args, ROOT / "x", [])
    assert {"data.augment=none", "backbone=small_cnn", "threads=1", "data.batch_size=64"} <= set(overrides)
    assert overrides[-1] == "seed=1"  # the user's overrides come last: they win


def test_reduce_counts_only_the_steps_after_the_warmup() -> None:
    """Samples (wall clock, user, sys, faults) at the end of steps 1..5; warm-up 2 times steps 3, 4, 5: from the
    end of step 2 to the end of step 5."""
    samples = [[100.0 + t, 10.0 * t, 1.0 * t, 1000 * t * t] for t in (1, 2, 4, 7, 11)]
    r = bench.reduce(samples, start=90.0, warmup=2)
    assert r["steps"] == 5
    assert r["rate"] == pytest.approx(3 / (111 - 102))
    assert r["user"] == pytest.approx((110 - 20) / 3) and r["sys"] == pytest.approx((11 - 2) / 3)
    assert r["faults"] == pytest.approx((121_000 - 4_000) / 3)
    assert r["first_step"] == pytest.approx(11.0)
    with pytest.raises(ValueError, match="3 steps recorded with 2 warm-up steps"):
        bench.reduce(samples[:3], start=90.0, warmup=2)
