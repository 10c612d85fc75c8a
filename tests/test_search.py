"""Random hyper-parameter search (``hparams_seed``) and per-fold selection among its candidates."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from dgkit.chain import chain_configs
from dgkit.compose import build
from dgkit.data.benchmark import seed_hash
from dgkit.data.style import BatchStylesStandardization
from dgkit.eval.records import Run
from dgkit.eval.selection import TrainingDomainValidation
from dgkit.identity import hparams_id
from dgkit.run import run_identity, train
from dgkit.search import apply_hparams_seed, check_spaces, draw, search_spaces, without_search
from tests.conftest import CONF

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


# --- search spaces of adapters and augmentations -----------------------------------------------------------------

ADAPTER_CONFIGS = sorted((CONF / "adapter").glob("*.yaml"))
TUNABLE = ("rank", "alpha", "num", "weight", "top_ratio", "reg_weight", "dropout")  # knobs a search may cover


def test_every_adapter_with_knobs_declares_a_search_space(tiny_cfg):
    for path in ADAPTER_CONFIGS:
        knobs = [k for k in OmegaConf.load(path) if k in TUNABLE]
        spaces = check_spaces(tiny_cfg(f"adapter={path.stem}"))  # every searched key is one the adapter takes
        adapter = sorted(k for k in spaces if k.startswith("adapter."))
        assert bool(adapter) == bool(knobs), path.stem  # freeze / none: nothing to tune, no search block
        if "rank" in knobs:
            assert "adapter.rank" in adapter, path.stem
    bss = [k for k in check_spaces(tiny_cfg("+augment=bss")) if k.startswith("augment.bss.")]
    assert sorted(bss) == ["augment.bss.p", "augment.bss.r_max"]


def test_adapter_draws_are_reproducible_land_in_the_config_and_build(tiny_cfg):
    cfg = tiny_cfg("adapter=lora", "hparams_seed=3")
    draws = apply_hparams_seed(cfg)
    assert draws == apply_hparams_seed(tiny_cfg("adapter=lora", "hparams_seed=3"))
    assert {"adapter.rank", "adapter.alpha", "method.optimizer.lr"} <= set(draws)
    assert (cfg.adapter.rank, cfg.adapter.alpha) == (draws["adapter.rank"], draws["adapter.alpha"])
    assert isinstance(cfg.adapter.rank, int) and cfg.adapter.rank in (4, 8, 16, 32)
    link = chain_configs(cfg)[0]
    assert "search" not in link and link["rank"] == draws["adapter.rank"]  # the drawn value is the argument
    _, method = build(cfg)
    ranks = {p.shape[0] for n, p in method.named_parameters() if "lora_A" in n}
    assert ranks == {draws["adapter.rank"]}


def test_adapter_draws_alone_make_another_candidate(tiny_cfg):
    def drawn(seed):
        cfg = tiny_cfg("adapter=pego", f"hparams_seed={seed}", "~method.search")  # only the adapter is searched
        return cfg, apply_hparams_seed(cfg)

    first, first_draws = drawn(1)
    assert set(first_draws) == {"adapter.rank", "adapter.num", "adapter.weight"}
    assert 1e-4 <= first_draws["adapter.weight"] <= 1e-2
    second, second_draws = drawn(2)
    assert second_draws != first_draws and hparams_id(second) != hparams_id(first)
    assert hparams_id(first) != hparams_id(tiny_cfg("adapter=pego"))


@pytest.mark.parametrize("group", [*(f"adapter={p.stem}" for p in ADAPTER_CONFIGS), "+augment=bss"])
def test_seed_zero_keeps_the_defaults_and_the_ids_of_collected_runs(tiny_cfg, group):
    cfg = tiny_cfg(group)
    defaults = OmegaConf.to_container(cfg, resolve=False)
    assert apply_hparams_seed(cfg) == {} and OmegaConf.to_container(cfg, resolve=False) == defaults
    collected = tiny_cfg(group)  # a run made before the search block existed: same config, no block
    with open_dict(collected):
        del collected["hparams_seed"]
        block = collected.augment.bss if group == "+augment=bss" else collected.adapter
        block.pop("search", None)
    assert hparams_id(cfg) == hparams_id(collected) and run_identity(cfg) == run_identity(collected)


def test_bss_draws_land_in_the_augmentation(tiny_cfg):
    cfg = tiny_cfg("+augment=bss", "hparams_seed=4")
    draws = apply_hparams_seed(cfg)
    assert cfg.augment.bss.r_max == draws["augment.bss.r_max"] and cfg.augment.bss.p == draws["augment.bss.p"]
    assert 0.02 <= cfg.augment.bss.r_max <= 0.25 and cfg.augment.bss.r_min <= cfg.augment.bss.r_max
    bss = instantiate(without_search(cfg.augment.bss))  # the drawn values are valid arguments
    assert isinstance(bss, BatchStylesStandardization)
    assert hparams_id(cfg) != hparams_id(tiny_cfg("+augment=bss"))


@pytest.mark.parametrize(
    ("key", "spec", "message"),
    [
        ("rank", {"dist": "normal", "low": 1, "high": 4}, r"'adapter.rank': dist 'normal' must be one of"),
        ("rank", {"dist": "choice", "values": []}, r"'adapter.rank': dist choice needs a non-empty list"),
        ("alpha", {"dist": "uniform", "low": 8}, r"'adapter.alpha': dist uniform needs numeric low and high"),
        ("alpha", {"dist": "log_uniform", "low": 0, "high": 8}, r"'adapter.alpha': log_uniform needs low > 0"),
        ("alpha", {"dist": "uniform", "low": 8, "high": 4}, r"'adapter.alpha': low 8.0 > high 4.0"),
        (
            "ranks",
            {"dist": "choice", "values": [4]},
            r"'adapter.ranks' is not in the config .*dgkit.adapters.LoRA takes: rank, alpha, dropout",
        ),
        ("_target_", {"dist": "choice", "values": ["x"]}, r"'adapter._target_' is not in the config"),
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_an_invalid_search_block_is_a_clear_error(tiny_cfg, key, spec, message, seed):
    cfg = tiny_cfg("adapter=lora", f"hparams_seed={seed}")
    with open_dict(cfg):
        OmegaConf.update(cfg, f"adapter.search.{key}", spec, merge=False)
    with pytest.raises(ValueError, match=message):
        apply_hparams_seed(cfg)


def test_a_key_the_adapter_does_not_take_is_refused(tiny_cfg):
    cfg = tiny_cfg(
        "adapter=lora", "hparams_seed=1", "+adapter.depth=2", "+adapter.search.depth={dist:choice,values:[2]}"
    )
    with pytest.raises(ValueError, match=r"'adapter.depth': dgkit.adapters.LoRA takes no 'depth'; .* takes: rank"):
        apply_hparams_seed(cfg)


def test_a_drawn_adapter_is_recorded_like_a_method_draw(tiny_cfg, tmp_path):
    train(tiny_cfg("adapter=lora", "hparams_seed=2", "~method.search", out="drawn"))
    run = json.loads((tmp_path / "drawn" / "run.json").read_text())
    assert set(run["draws"]) == {"adapter.rank", "adapter.alpha"}
    saved = OmegaConf.load(tmp_path / "drawn" / "config.yaml").adapter
    assert (saved.rank, saved.alpha) == (run["draws"]["adapter.rank"], run["draws"]["adapter.alpha"])
    assert run["hparams"] != hparams_id(tiny_cfg("adapter=lora"))


# --- search spaces of the test-time adaptations ------------------------------------------------------------------

TTA_CONFIGS = sorted((CONF / "tta").glob("*.yaml"))
TTA_KNOBS = {"tent": {"tta.optimizer.lr", "tta.steps"}, "t3a": {"tta.filter_k"},
             "adanpc": {"tta.k", "tta.tau", "tta.beta"}, "itta": {"tta.optimizer.lr"},
             "drm": {"tta.optimizer.lr", "tta.steps", "tta.beta", "tta.gamma"},
             "bn_adapt": set(), "none": set()}  # fmt: skip


@pytest.mark.parametrize("path", TTA_CONFIGS, ids=lambda p: p.stem)
def test_every_tta_search_space_is_valid_and_its_draws_build(tiny_cfg, path):
    cfg = tiny_cfg(f"tta={path.stem}", "~method.search")  # the TTA's keys alone
    assert {k for k in check_spaces(cfg) if k.startswith("tta.")} == TTA_KNOBS[path.stem]
    defaults = OmegaConf.to_container(cfg.tta)
    assert apply_hparams_seed(cfg) == {} and OmegaConf.to_container(cfg.tta) == defaults  # seed 0: the defaults
    drawn = tiny_cfg(f"tta={path.stem}", "~method.search", "hparams_seed=7")
    draws = apply_hparams_seed(drawn)
    assert set(draws) == TTA_KNOBS[path.stem]
    for key, value in draws.items():
        assert OmegaConf.select(drawn, key) == value
        spec = search_spaces(drawn)[key]
        assert value in spec["values"] if spec["dist"] == "choice" else spec["low"] <= value <= spec["high"]
    tta = instantiate(without_search(drawn.tta))  # the drawn values are valid arguments
    if "tta.filter_k" in draws:
        assert tta.filter_k == draws["tta.filter_k"]


def test_tta_draws_are_keyed_like_the_others_and_leave_them_unchanged(tiny_cfg):
    alone = apply_hparams_seed(tiny_cfg("method=dann", "hparams_seed=5"))
    with_tta = apply_hparams_seed(tiny_cfg("method=dann", "tta=tent", "hparams_seed=5"))
    assert with_tta == {**alone, "tta.optimizer.lr": with_tta["tta.optimizer.lr"], "tta.steps": with_tta["tta.steps"]}
    assert with_tta == apply_hparams_seed(tiny_cfg("method=dann", "tta=tent", "hparams_seed=5"))  # deterministic
    # the draw is the hash-seeded draw of its full key, as for every other key
    spec = {"dist": "log_uniform", "low": 1.0e-4, "high": 1.0e-2}
    assert with_tta["tta.optimizer.lr"] == draw(spec, seed_hash(5, "tta.optimizer.lr"))
    lrs = {apply_hparams_seed(tiny_cfg("tta=tent", f"hparams_seed={n}"))["tta.optimizer.lr"] for n in range(1, 9)}
    assert len(lrs) == 8 and all(1e-4 <= lr <= 1e-2 for lr in lrs)


def test_a_tta_search_key_the_tta_does_not_take_is_refused(tiny_cfg):
    cfg = tiny_cfg("tta=t3a", "+tta.search.k={dist:choice,values:[5]}")
    with pytest.raises(ValueError, match=r"'tta.k' is not in the config .*dgkit.tta.T3A takes: filter_k"):
        apply_hparams_seed(cfg)  # checked before any run, hparams_seed=0 included


def test_a_drawn_tta_is_recorded_and_used(tiny_cfg, tmp_path):
    final = train(tiny_cfg("tta=t3a", "hparams_seed=3", "~method.search", out="drawn"))
    run = json.loads((tmp_path / "drawn" / "run.json").read_text())
    k = run["draws"]["tta.filter_k"]
    assert set(run["draws"]) == {"tta.filter_k"} and k in (1, 5, 20, 50, 100, -1)
    result = json.loads((tmp_path / "drawn" / "tta" / "t3a_bs64.json").read_text())
    assert result["tta_config"]["filter_k"] == k and "search" not in result["tta_config"]
    assert "t3a" in final["tta"]
