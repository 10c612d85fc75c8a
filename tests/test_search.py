"""Random hyper-parameter search (``hparams_seed``) and per-fold selection among its candidates."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from omegaconf import OmegaConf, open_dict

from dgkit.eval.records import Run
from dgkit.eval.selection import TrainingDomainValidation
from dgkit.identity import hparams_id
from dgkit.run import train
from dgkit.search import apply_hparams_seed, draw, search_spaces

pytestmark = pytest.mark.usefixtures("one_thread")


def test_seed_zero_trains_the_defaults(tiny_cfg):
    cfg = tiny_cfg("method=dann")
    default_lr, default_lambda = cfg.method.optimizer.lr, cfg.method.lambda_max
    assert apply_hparams_seed(cfg) == {}
    assert (cfg.method.optimizer.lr, cfg.method.lambda_max) == (default_lr, default_lambda)
    without = tiny_cfg("method=dann")
    with open_dict(without):
        del without["hparams_seed"]
    assert hparams_id(cfg) == hparams_id(without)  # the ids of runs made before the search existed


def test_draws_are_deterministic_and_independent_per_key(tiny_cfg):
    first = apply_hparams_seed(tiny_cfg("method=dann", "hparams_seed=5"))
    assert first == apply_hparams_seed(tiny_cfg("method=dann", "hparams_seed=5"))
    assert set(first) == {
        f"method.{k}" for k in ("lambda_max", "mlp_width", "mlp_depth", "mlp_dropout", "optimizer.lr")
    }
    other = apply_hparams_seed(tiny_cfg("method=dann", "hparams_seed=6"))
    assert other != first
    # a key added to the space leaves the other keys' draws unchanged
    more = apply_hparams_seed(
        tiny_cfg("method=dann", "hparams_seed=5", "+method.search.gamma={dist:uniform,low:1,high:20}")
    )
    assert {k: v for k, v in more.items() if k != "method.gamma"} == first and 1 <= more["method.gamma"] <= 20


def test_distributions_match_their_definitions():
    seeds = range(4000)
    logs = [math.log10(draw({"dist": "log_uniform", "low": 0.01, "high": 100}, s)) for s in seeds]
    assert min(logs) >= -2 and max(logs) <= 2 and abs(np.mean(logs)) < 0.1  # uniform in log10 on [-2, 2]
    widths = [draw({"dist": "log2_int", "low": 6, "high": 10}, s) for s in seeds]
    assert all(isinstance(w, int) and 64 <= w < 1024 for w in widths)
    assert abs(np.mean(np.log2(widths)) - 8.0) < 0.1  # log2 uniform on [6, 10), floored: mean a bit under 8
    picks = [draw({"dist": "choice", "values": [3, 4, 5]}, s) for s in seeds]
    assert set(picks) == {3, 4, 5} and all(abs(picks.count(v) / len(picks) - 1 / 3) < 0.03 for v in (3, 4, 5))
    with pytest.raises(ValueError, match="dist must be one of"):
        draw({"dist": "normal", "low": 0, "high": 1}, 0)


def test_every_method_declares_a_search_space(tiny_cfg):
    for method in ("erm", "dann", "sharpness", "udim", "linear_probe", "simclr", "drm", "itta"):
        spaces = search_spaces(tiny_cfg(f"method={method}"))
        assert "method.optimizer.lr" in spaces, method


def test_a_search_key_must_exist(tiny_cfg):
    with pytest.raises(ValueError, match="'method.nope' is not in the config"):
        apply_hparams_seed(tiny_cfg("hparams_seed=1", "+method.search.nope={dist:uniform,low:0,high:1}"))


def test_a_drawn_run_records_its_draws_and_is_another_candidate(tiny_cfg, tmp_path):
    train(tiny_cfg("hparams_seed=2", out="drawn"))
    run = json.loads((tmp_path / "drawn" / "run.json").read_text())
    lr = run["draws"]["method.optimizer.lr"]
    assert run["hparams_seed"] == 2 and 3.16e-5 <= lr <= 3.16e-3
    assert OmegaConf.load(tmp_path / "drawn" / "config.yaml").method.optimizer.lr == lr
    assert run["hparams"] != hparams_id(tiny_cfg())


def _run(hparams: str, test: str, val: dict[int, float], score: dict[int, float]) -> Run:
    domains = ("A", "B", "C")
    records = []
    for step in val:
        record = {"step": step}
        for d in domains:
            record[f"acc/{d}/out"] = val[step] if d != test else 0.0
            record[f"acc/{d}/in"] = score[step] if d == test else 0.0
        records.append(record)
    return Run("toy", domains, (test,), 0, "ERM", hparams, records=records)


def test_selection_is_per_fold_among_that_folds_candidates():
    runs = [
        _run("h1", "A", {100: 0.9}, {100: 0.30}),  # fold A: h1 validates best
        _run("h2", "A", {100: 0.6}, {100: 0.80}),
        _run("h1", "B", {100: 0.5}, {100: 0.40}),  # fold B: h2 validates best
        _run("h2", "B", {100: 0.7}, {100: 0.20}),
    ]
    rule = TrainingDomainValidation()
    a, b = rule.select(runs, "A"), rule.select(runs, "B")
    assert (a.hparams, a.test_score) == ("h1", 0.30) and (b.hparams, b.test_score) == ("h2", 0.20)
