"""The embedded hist_maps benchmark: shapes and classes, seeded, cached with a checksummed manifest, binary
variants, masks that describe the drawn tiles, and a segmentation DataModule over it."""

from __future__ import annotations

import numpy as np
import pytest

from dgkit.backbones.base import DataConfig
from dgkit.data.benchmarks import hist_maps
from dgkit.data.datamodule import DGDataModule
from dgkit.data.embedded import hist_maps as hm
from dgkit.data.embedded import read_manifest

N = 6


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    hm.load(path, n_per_domain=N)
    return path


def test_tiles_masks_and_classes(root):
    arrays = hm.load(root, n_per_domain=N)
    assert list(arrays) == ["modern", "ink", "sepia", "hatched"]
    for domain, (x, m) in arrays.items():
        assert x.shape == (N, 128, 128, 3) and x.dtype == np.uint8
        assert m.shape == (N, 128, 128) and m.dtype == np.uint8
        assert set(np.unique(m).tolist()) == {0, 1, 2}, domain
        fractions = np.bincount(m.ravel(), minlength=3) / m.size
        assert fractions[1] > 0.01 and fractions[2] > 0.02, (domain, fractions)


def test_styles_differ_and_masks_describe_the_drawing(root):
    arrays = hm.load(root, n_per_domain=N)
    paper = {d: x[m == 0].mean(0) for d, (x, m) in arrays.items()}  # mean background colour per style
    assert np.abs(paper["modern"] - paper["sepia"]).max() > 30
    for domain, (x, m) in arrays.items():  # features are darker or coloured: not the paper
        grey = x.astype(float).mean(-1)
        assert abs(grey[m == 2].mean() - grey[m == 0].mean()) > 10, domain
        assert abs(grey[m == 1].mean() - grey[m == 0].mean()) > 10, domain


def test_seeded_and_cached_with_a_manifest(root, tmp_path):
    manifest = read_manifest("hist_maps", root)
    assert manifest["counts"] == {d: N for d in hm.DOMAINS} and set(manifest["checksums"]) == set(hm.DOMAINS)
    again = hm.generate(n_per_domain=2, seed=0)
    cached = hm.load(root, n_per_domain=N)
    assert np.array_equal(again["ink"][0], cached["ink"][0][:2])  # a domain's tiles do not depend on n
    other = hm.generate(n_per_domain=2, seed=1)
    assert not np.array_equal(other["ink"][0], again["ink"][0])


@pytest.mark.parametrize("variant,fg", [("hist_maps", None), ("hist_maps_linear", 1), ("hist_maps_areal", 2)])
def test_variants_and_datamodule(root, variant, fg):
    bench = hist_maps(root, variant=variant, n_per_domain=N)
    assert bench.name == variant and bench.num_classes == (3 if fg is None else 2)
    full = hm.load(root, n_per_domain=N)["sepia"][1]
    _, mask = bench.datasets["sepia"][0]
    assert np.array_equal(mask, full[0] if fg is None else (full[0] == fg).astype(np.uint8))
    dm = DGDataModule(bench, ["hatched"], DataConfig((32, 32)), batch_size=2, augment="maps", holdout_fraction=0.34)
    x, y = next(iter(dm.train_dataloader()))[0]["modern"]
    assert x.shape == (2, 3, 32, 32) and y.shape == (2, 32, 32) and int(y.max()) < bench.num_classes
    with pytest.raises(ValueError, match="data.variant='roads'"):
        hist_maps(root, variant="roads", n_per_domain=N)
