"""Default row labels and algorithm choices (dgkit.labels), and the mixed-row warning (dgkit.eval.mixed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from dgkit.config import register_resolvers
from dgkit.eval import Run
from dgkit.eval.mixed import mixed_rows
from dgkit.labels import algorithm_choices, default_tag
from tests.test_collect_results import rec, run_main, write_run

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_train(*overrides: str) -> DictConfig:
    """``conf/train.yaml`` composed as ``train.py`` does, unresolved."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize(
    ("overrides", "tag"),
    [
        (["+exp=digits_erm"], "ERM"),
        (["+exp=digits_erm", "+augment=bss"], "ERM+BSS"),
        (["+exp=digits_erm", "+augment=bss", "augment.bss.p=0"], "ERM"),  # a disabled augmentation is none
        (["+exp=digits_erm", "method=dann"], "DANN"),
        (["+exp=digits_erm", "method=dann", "method.variant=alternating"], "DANN-alt"),
        (
            ["method=dann", "method.variant=alternating", "+augment=bss", "backbone=test_vit", "adapter=lora"],
            "DANN-alt+BSS+LoRA",
        ),
        (["method=dann", "backbone=test_vit", "adapter=soma"], "DANN+SoMA"),
        (["+exp=digits_peft"], "ERM+LoRA"),
        (["adapter=freeze"], "ERM+Freeze"),
        (["method=sharpness"], "Sharpness"),
        (["+exp=digits_simclr_bss"], "SimCLR+BSS"),
        (["+exp=digits_linear_probe", "backbone.weights=null"], "Probe(random-init)"),
        (["method=linear_probe"], "Probe(random-init)"),  # small_cnn has no weights key: random init
        (["+exp=digits_linear_probe", "backbone.weights=/elsewhere/simclr_street.safetensors"], "Probe(simclr_street)"),
    ],
)
def test_default_tag(overrides, tag):
    assert default_tag(compose_train(*overrides)) == tag


def test_algorithms_that_shared_a_tag_now_differ():
    erm, bss = compose_train("+exp=digits_erm"), compose_train("+exp=digits_erm", "+augment=bss")
    assert default_tag(erm) != default_tag(bss)
    grl = compose_train("+exp=digits_erm", "method=dann")
    alternating = compose_train("+exp=digits_erm", "method=dann", "method.variant=alternating")
    assert default_tag(grl) != default_tag(alternating)


def test_probe_is_named_after_the_run_that_exported_its_weights(tmp_path):
    ssl_run = tmp_path / "ssl" / "street"
    ssl_run.mkdir(parents=True)
    (ssl_run / "run.json").write_text(json.dumps({"dataset": "digits_dg", "tag": "SimCLR+BSS"}))
    weights = ssl_run / "backbone.safetensors"
    weights.write_bytes(b"")
    cfg = compose_train("+exp=digits_linear_probe", f"backbone.weights={weights}")
    assert default_tag(cfg) == "Probe(SimCLR+BSS)"
    assert algorithm_choices(cfg)["init"] == "SimCLR+BSS"
    # a probe whose weights are still ``???`` is not named after a guess
    assert default_tag(compose_train("+exp=digits_linear_probe")) == "LinearProbe"


def test_resolved_config_gives_the_same_tag_and_choices(tmp_path):
    cfg = compose_train("method=dann", "method.variant=alternating", "+augment=bss", f"output_dir={tmp_path}")
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    assert default_tag(resolved) == default_tag(cfg) == "DANN-alt+BSS"
    assert algorithm_choices(resolved) == algorithm_choices(cfg)


def test_algorithm_choices():
    choices = algorithm_choices(
        compose_train("method=dann", "method.variant=alternating", "+augment=bss", "backbone=test_vit", "adapter=lora")
    )
    assert choices == {
        "method": "DANN:alternating",
        "adapter": "LoRA",
        "augment": "bss",
        "backbone": "TimmBackbone:test_vit",
        "init": "random-init",
        "task": "Classification",
        "transforms": "none",
    }
    plain = algorithm_choices(compose_train("+exp=digits_erm"))
    assert plain == {
        "method": "ERM",
        "adapter": "FullFineTuning",
        "augment": "none",
        "backbone": "SmallCNN",
        "init": "random-init",
        "task": "Classification",
        "transforms": "none",
    }
    assert all(isinstance(v, str) for v in plain.values())  # run.json's contract: strings only


def test_transform_links_join_the_tag_and_choices():
    cfg = compose_train("+exp=digits_erm")
    cfg.transforms = [{"_target_": "tests.test_foundation.LowRankHead", "rank": 2}]
    assert default_tag(cfg) == "ERM+LowRankHead"
    assert algorithm_choices(cfg)["transforms"] == "LowRankHead"


def _run(path: str, hparams: str, choices: dict[str, str], tag: str = "ERM") -> Run:
    return Run(
        dataset="toy",
        domains=("A", "B", "C"),
        test_domains=("A",),
        seed=0,
        tag=tag,
        hparams=hparams,
        path=Path(path),
        choices=choices,
    )


ERM = algorithm_choices(compose_train("+exp=digits_erm"))
ERM_BSS = algorithm_choices(compose_train("+exp=digits_erm", "+augment=bss"))


def test_mixed_rows_warns_on_a_row_of_two_algorithms():
    runs = [
        _run("sweep/erm/h0", "h0", ERM),
        _run("sweep/erm/h1", "h1", ERM),
        _run("sweep/bss/h2", "h2", ERM_BSS),
        _run("sweep/old", "h3", {}),  # an old folder without choices: ignored
        _run("sweep/dann", "h0", {**ERM, "method": "DANN:grl"}, tag="DANN"),
    ]
    (warning,) = mixed_rows(runs)
    assert "'ERM'" in warning and "'toy'" in warning
    assert "augment: bss (1 run, e.g. sweep/bss/h2) vs none (2 runs, e.g. sweep/erm/h0)" in warning
    assert "method" not in warning.split("):", 1)[1]  # only the differing key is named
    assert "old" not in warning


def test_mixed_rows_is_silent_on_one_algorithm_with_two_hparams_ids():
    runs = [_run("sweep/h0", "h0", ERM), _run("sweep/h1", "h1", ERM), _run("sweep/legacy", "h2", {})]
    assert mixed_rows(runs) == []


def test_collect_results_prints_the_warning(tmp_path, capsys):
    erm = write_run(tmp_path, ("A",), [rec(100, A_in=0.2)], hparams="h0")
    bss = write_run(tmp_path, ("A",), [rec(100, A_in=0.4)], hparams="h1")
    for path, choices in ((erm, ERM), (bss, ERM_BSS)):
        meta = json.loads((path / "run.json").read_text())
        (path / "run.json").write_text(json.dumps({**meta, "choices": choices}))
    assert run_main([str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "warning: row 'ERM' of dataset 'toy' mixes algorithms" in err
    assert "augment: bss" in err and str(bss) in err and str(erm) in err

    meta = json.loads((bss / "run.json").read_text())
    (bss / "run.json").write_text(json.dumps({**meta, "choices": ERM}))
    assert run_main([str(tmp_path)]) == 0
    assert "warning" not in capsys.readouterr().err
