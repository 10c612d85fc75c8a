"""Every shipped config composes; groups can be swapped on top of an experiment; bad names are listed."""

from pathlib import Path

import pytest
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from tests.conftest import CONF, compose_cfg

EXPERIMENTS = sorted(p.stem for p in (CONF / "exp").glob("*.yaml"))


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_experiment_composes(exp, tmp_path):
    cfg = compose_cfg([f"+exp={exp}"], tmp_path)
    container = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert container["trainer"]["max_steps"] > 0
    assert container["data"]["test_domains"]


def test_domainbed_presets():
    for exp, data, interval in [("pacs_erm", "PACS", 300), ("domainnet_erm", "DomainNet", 1000)]:
        cfg = compose_cfg([f"+exp={exp}"], Path("/tmp/x"))
        assert cfg.data.name == data and cfg.backbone.name == "resnet50.tv_in1k" and cfg.backbone.freeze_bn
        assert cfg.trainer.max_steps == 5001 and cfg.trainer.val_check_interval == interval
        assert cfg.method.optimizer.lr == 5e-5 and cfg.data.batch_size == 32


def test_swap_groups_on_top_of_experiment(tmp_path):
    cfg = compose_cfg(["+exp=quickstart", "data=folder", "data.root=/data/mine", "backbone=test_vit"], tmp_path)
    assert cfg.data.benchmark._target_ == "dgkit.data.benchmarks.folder"
    assert cfg.data.benchmark.root == "/data/mine"
    assert cfg.backbone.name == "test_vit"
    assert cfg.trainer.max_steps == 300  # the experiment's own settings stay
    assert cfg.data.test_domains == ["street"]  # the experiment's held-out domain is kept (override it too)


def test_unknown_choice_lists_options(tmp_path):
    with pytest.raises(MissingConfigException, match=r"(?s)Could not find 'method/magic'.*erm"):
        compose_cfg(["method=magic"], tmp_path)


def test_trainer_group_is_lightning_arguments(tmp_path):
    cfg = compose_cfg(["trainer.max_steps=7", "trainer.devices=2"], tmp_path)
    assert cfg.trainer._target_ == "pytorch_lightning.Trainer"
    assert cfg.trainer.max_steps == 7 and cfg.trainer.devices == 2
