"""Few-shot training (``data.shots=K``): K seeded training images per source domain, drawn from its ``in`` split,
for classification and segmentation alike; evaluation splits and the held-out domain untouched; ids unchanged by
``shots: null``."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dgkit.backbones.base import DataConfig
from dgkit.data.benchmarks import seg_folder, synthetic
from dgkit.data.datamodule import DGDataModule
from dgkit.identity import hparams_id
from tests.conftest import ROOT
from tests.test_seg_data import write_seg_tree


def _classification(**kw) -> DGDataModule:
    args = dict(test_domains=["c"], data_config=DataConfig((16, 16)), batch_size=4, eval_batch_size=10)
    return DGDataModule(synthetic(n_per_domain=40), **{**args, **kw})


@pytest.fixture
def segmentation(tmp_path):
    bench = seg_folder(write_seg_tree(tmp_path / "maps", n=10, size=16), num_classes=2)

    def make(**kw) -> DGDataModule:
        args = dict(test_domains=["c"], data_config=DataConfig((16, 16)), batch_size=2, holdout_fraction=0.2)
        return DGDataModule(bench, **{**args, **kw})

    return make


def _check_shots(make, k: int) -> None:
    full, dm = make(), make(shots=k)
    assert dm.source_domains == ["a", "b"]
    for d in dm.source_domains:
        picked = dm.train_indices[d]
        assert len(picked) == len(set(picked.tolist())) == k  # exactly k distinct images
        assert set(picked.tolist()) <= set(dm.splits[(d, "in")].tolist())  # all from the domain's in split
        assert len(dm.train_split(d)) == k and dm.stream(d).n == k  # the training stream sees only them
        for split in ("in", "out"):  # evaluation splits unchanged
            assert dm.splits[(d, split)].tolist() == full.splits[(d, split)].tolist()
            assert len(dm.split(d, split)) == len(full.splits[(d, split)])
    assert "c" not in dm.train_indices  # the held-out domain is never trained on, its splits untouched
    assert all(dm.splits[("c", s)].tolist() == full.splits[("c", s)].tolist() for s in ("in", "out"))
    assert dm.eval_names == full.eval_names
    # seeded: the same for the same seed (whichever domain is held out), different for another seed
    assert all(make(shots=k).train_indices[d].tolist() == dm.train_indices[d].tolist() for d in ("a", "b"))
    assert make(shots=k, test_domains=["b"]).train_indices["a"].tolist() == dm.train_indices["a"].tolist()
    other = make(shots=k, split_seed=1)
    assert any(other.train_indices[d].tolist() != dm.train_indices[d].tolist() for d in ("a", "b"))
    assert all(set(other.train_indices[d].tolist()) <= set(other.splits[(d, "in")].tolist()) for d in ("a", "b"))


def test_shots_on_classification():
    _check_shots(_classification, 5)


def test_shots_on_segmentation(segmentation):
    _check_shots(segmentation, 3)
    x, y = next(iter(segmentation(shots=3).train_dataloader()))[0]["a"]
    assert x.shape == (2, 3, 16, 16) and y.shape == (2, 16, 16)


def test_too_many_shots_names_the_domain_and_its_size(segmentation):
    n_in = len(segmentation().splits[("a", "in")])  # 10 tiles, 2 held out: 8
    assert n_in == 8
    segmentation(shots=n_in)  # the whole in split is allowed
    with pytest.raises(ValueError, match=r"data.shots=9: source domain 'a' has only 8 images in its 'in'"):
        segmentation(shots=9)
    with pytest.raises(ValueError, match=r"data.shots=33: source domain 'a' has only 32 images"):
        _classification(shots=33)
    with pytest.raises(ValueError, match="data.shots=0 must be >= 1"):
        _classification(shots=0)
    with pytest.raises(ValueError, match="set one of them"):
        _classification(shots=2, labels_per_class=1)


def test_shots_in_the_config_and_the_identity(tiny_cfg):
    cfg = tiny_cfg()
    assert cfg.data.shots is None
    without = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    del without.data["shots"]
    assert hparams_id(cfg) == hparams_id(without)  # shots=null: the ids of runs made before the key existed
    five = tiny_cfg("data.shots=5")
    assert hparams_id(five) != hparams_id(cfg) and hparams_id(five) != hparams_id(tiny_cfg("data.shots=6"))
    data = instantiate(five.data, _partial_=True)(data_config=None, split_seed=int(five.seed))
    assert data.shots == 5 and all(len(data.train_indices[d]) == 5 for d in data.source_domains)
    for name in ("hist_maps", "seg_folder", "folder", "digits_dg", "rotated_digits"):
        assert OmegaConf.load(ROOT / "conf" / "data" / f"{name}.yaml").shots is None
