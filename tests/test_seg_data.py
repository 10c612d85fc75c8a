"""Segmentation data: the folder layout, its errors, per-domain batches, and masks that follow the image through
every training augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dgkit.backbones.base import DataConfig
from dgkit.data.benchmarks import seg_folder
from dgkit.data.datamodule import DGDataModule, TransformedDataset
from dgkit.data.transforms import POLICIES, build_transform

DOMAINS = ("a", "b", "c")


def _pattern(rng: np.random.Generator, size: int) -> np.ndarray:
    """A grey image of big asymmetric black/white blocks (flips and rotations change it)."""
    cells = rng.integers(0, 2, (4, 4)).astype(np.uint8) * 255
    cells[0, 0], cells[0, 1], cells[1, 0] = 255, 0, 0  # break every symmetry
    grey = np.kron(cells, np.ones((size // 4, size // 4), np.uint8))
    return np.repeat(grey[..., None], 3, axis=2)


def write_seg_tree(root: Path, n: int = 6, size: int = 16, seed: int = 0) -> Path:
    """``root/<domain>/{images,masks}/<i>.png``: mask = 1 where the image is white, a 255 (ignore) corner."""
    rng = np.random.default_rng(seed)
    for d in DOMAINS:
        (root / d / "images").mkdir(parents=True)
        (root / d / "masks").mkdir(parents=True)
        for i in range(n):
            image = _pattern(rng, size)
            mask = (image[..., 0] > 127).astype(np.uint8)
            mask[0, 0] = 255
            Image.fromarray(image).save(root / d / "images" / f"t{i}.png")
            Image.fromarray(mask).save(root / d / "masks" / f"t{i}.png")
    return root


def test_domains_splits_and_per_domain_batches(tmp_path):
    bench = seg_folder(write_seg_tree(tmp_path / "maps"), num_classes=2)
    assert bench.domains == list(DOMAINS) and bench.num_classes == 2
    dm = DGDataModule(bench, test_domains=["c"], data_config=DataConfig((16, 16)), batch_size=2, holdout_fraction=0.34)
    assert dm.source_domains == ["a", "b"] and len(dm.splits[("a", "out")]) == 2 and len(dm.splits[("a", "in")]) == 4
    batch = next(iter(dm.train_dataloader()))[0]
    assert set(batch) == {"a", "b"}
    x, y = batch["a"]
    assert x.shape == (2, 3, 16, 16) and y.shape == (2, 16, 16) and y.dtype == torch.int64
    assert set(y.unique().tolist()) <= {0, 1, 255}
    x, y = next(iter(dm.val_dataloader()[0]))
    assert y.shape[1:] == (16, 16)
    with pytest.raises(ValueError, match="data.num_classes=3"):
        DGDataModule(bench, test_domains=["c"], num_classes=3)


def test_an_image_without_a_mask_is_named(tmp_path):
    root = write_seg_tree(tmp_path / "maps")
    (root / "b" / "masks" / "t3.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"without a mask:\n.*b/images/t3.png"):
        seg_folder(root, num_classes=2)


def test_a_mask_of_another_size_names_both_files(tmp_path):
    root = write_seg_tree(tmp_path / "maps")
    Image.fromarray(np.zeros((12, 16), np.uint8)).save(root / "a" / "masks" / "t2.png")
    with pytest.raises(ValueError, match=r"mask .*a/masks/t2.png is 16x12 px but its image .*a/images/t2.png is 16x16"):
        seg_folder(root, num_classes=2)
    bench = seg_folder(root, num_classes=2, verify=False)  # unchecked at setup: the same error when loaded
    with pytest.raises(ValueError, match=r"a/masks/t2.png is 16x12"):
        bench.datasets["a"][2]


def test_a_class_id_out_of_range_names_the_file_and_the_id(tmp_path):
    root = write_seg_tree(tmp_path / "maps")
    mask = np.zeros((16, 16), np.uint8)
    mask[3, 3] = 7
    Image.fromarray(mask).save(root / "c" / "masks" / "t0.png")
    with pytest.raises(ValueError, match=r"c/masks/t0.png holds class id 7 .*num_classes=2"):
        seg_folder(root, num_classes=2)
    assert seg_folder(root, num_classes=8).num_classes == 8  # 7 is fine with 8 classes, and 255 always


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, n: int, size: int) -> None:
        rng = np.random.default_rng(3)
        self.images = [_pattern(rng, size) for _ in range(n)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        image = self.images[i]
        return image, (image[..., 0] > 127).astype(np.uint8)  # the mask drawn from the image's own pixels


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_the_mask_follows_the_image_through_every_training_augmentation(policy):
    cfg = DataConfig((24, 24), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    data = TransformedDataset(_Pairs(4, 32), build_transform(cfg, policy, train=True), seed=0, domain="a")
    for draw in range(24):
        x, y = data[(draw % 4, draw)]
        grey = (x * 0.5 + 0.5).mean(0)  # back to [0, 1]; colour jitter keeps white > 0.6 and black < 0.4 here
        # pixels whose 3x3 neighbourhood is all white or all black: away from block edges, where bilinear (image)
        # and nearest (mask) resampling may disagree by a sub-pixel; a misaligned flip or crop is far larger
        lo = -F.max_pool2d(-grey[None, None], 3, stride=1, padding=1)[0, 0]
        hi = F.max_pool2d(grey[None, None], 3, stride=1, padding=1)[0, 0]
        clear = (lo > 0.6) | (hi < 0.4)
        assert clear.float().mean() > 0.6
        assert torch.equal(y[clear], (grey[clear] > 0.5).long()), f"{policy}: mask misaligned at draw {draw}"
