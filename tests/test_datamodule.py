"""Per-domain training batches and every domain's in/out split for evaluation."""

import pytest
import torch

from dgkit.backbones.base import DataConfig
from dgkit.data import DGDataModule
from dgkit.data.benchmarks import synthetic


def _dm(**kw):
    args = dict(test_domains=["c"], data_config=DataConfig((16, 16)), batch_size=4, eval_batch_size=10)
    args.update(kw)
    return DGDataModule(synthetic(n_per_domain=40), **args)


def test_training_batch_has_every_source_domain():
    dm = _dm()
    assert dm.source_domains == ["a", "b"]
    batch, _, _ = next(iter(dm.train_dataloader()))
    assert set(batch) == {"a", "b"}
    x, y = batch["a"]
    assert x.shape == (4, 3, 16, 16) and y.shape == (4,) and y.dtype == torch.int64


def test_eval_loaders_cover_all_domains_in_and_out():
    dm = _dm()
    loaders = dm.val_dataloader()
    assert dm.eval_names == [(d, s) for d in ("a", "b", "c") for s in ("in", "out")]
    sizes = [len(loader.dataset) for loader in loaders]
    assert sizes == [32, 8] * 3  # 40 images, out = floor(0.2 * 40)


def test_splits_independent_of_held_out_domain():
    a = _dm(test_domains=["c"]).splits[("a", "out")]
    b = _dm(test_domains=["b"]).splits[("a", "out")]
    assert a.tolist() == b.tolist()


def test_bad_test_domains():
    with pytest.raises(ValueError, match=r"unknown domain 'z'; valid domains are \['a', 'b', 'c'\]"):
        _dm(test_domains=["z"])
    with pytest.raises(ValueError, match="holds out every domain"):
        _dm(test_domains=["a", "b", "c"])
