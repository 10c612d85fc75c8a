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


def _folder_dm(tmp_path, **kw):
    from dgkit.data.benchmarks import folder
    from tests.conftest import write_image_tree

    tree = folder(write_image_tree(tmp_path / "tree", per_class=5, size=12), verify=False)
    args = dict(test_domains=["night"], data_config=DataConfig((12, 12)), batch_size=3, augment="imagenet")
    return DGDataModule(tree, **{**args, **kw})


def test_per_image_steps_follow_every_domains_stream_and_workers_change_nothing(tmp_path):
    """Folders: one loader serves every source domain; its batches are the per-image items at the streams' keys,
    with or without workers, and data.num_workers=2 starts 2 worker processes, not 2 per domain."""
    import multiprocessing

    dm = _folder_dm(tmp_path)
    assert not dm.batch_augment
    it = iter(dm.train_dataloader())
    batches = [next(it)[0] for _ in range(3)]
    for d in dm.source_domains:
        dataset, stream = dm.train_split(d), iter(dm.stream(d))
        for batch in batches:
            items = [dataset[next(stream)] for _ in range(3)]
            assert torch.equal(batch[d][0], torch.stack([x for x, _ in items]))
            assert batch[d][1].tolist() == [y for _, y in items]
    pooled = _folder_dm(tmp_path / "again", num_workers=2)
    it = iter(pooled.train_dataloader())
    again = [next(it)[0] for _ in range(3)]
    assert len(multiprocessing.active_children()) == 2  # one pool for both source domains
    for a, b in zip(batches, again):
        assert all(torch.equal(a[d][0], b[d][0]) and torch.equal(a[d][1], b[d][1]) for d in dm.source_domains)
