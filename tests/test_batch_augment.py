"""Batch augmentation of in-memory benchmarks: seeded per step, the per-image pipeline's distribution, the path
chosen from the dataset type."""

from __future__ import annotations

import colorsys
import itertools

import albumentations as A
import cv2
import numpy as np
import pytest
import torch

from dgkit.backbones.base import DataConfig
from dgkit.data import DGDataModule
from dgkit.data.batch_augment import BATCH_POLICIES, SHIFT, BatchAugment, _shift_hue, crop_boxes
from dgkit.data.benchmarks import folder, synthetic
from dgkit.data.datamodule import DomainStream, TransformedDataset
from dgkit.data.transforms import POLICIES, build_transform
from tests.conftest import write_image_tree

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = DataConfig(input_size=(20, 20), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


def _dm(augment: str = "digits", **kw) -> DGDataModule:
    args = dict(test_domains=["c"], data_config=CFG, batch_size=8, augment=augment)
    return DGDataModule(synthetic(n_per_domain=40), **{**args, **kw})


def _coordinate_image(size: int = 32) -> np.ndarray:
    """Gray-free image whose red channel is 4·row and green 4·column: any pixel tells where it came from."""
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    return np.stack([rows * 4, cols * 4, np.full_like(rows, 7)], axis=-1).astype(np.uint8)


def test_both_paths_know_every_policy():
    assert set(BATCH_POLICIES) == set(POLICIES)
    with pytest.raises(ValueError, match=r"data.augment='fancy'.*\['digits', 'imagenet', 'maps', 'none'\]"):
        BatchAugment(CFG, "fancy")


def test_no_augmentation_is_identical_to_the_per_image_pipeline():
    dm = _dm("none", data_config=DataConfig((20, 20), mean=CFG.mean, std=CFG.std))  # 16 px resized to 20
    per_image = dm.train_split("a")
    loader = dm.batch_loader("a")
    idx, draw = next(dm.stream("a").blocks())
    x, y = loader.batch(idx, draw)
    expected = torch.stack([per_image[(int(i), draw + k)][0] for k, i in enumerate(idx)])
    assert torch.equal(x, expected)  # albumentations' resize and uint8 normalisation, bit for bit
    assert y.tolist() == [per_image[int(i)][1] for i in idx]


def test_same_step_same_batch_other_step_other_batch():
    dm = _dm("digits")
    first = list(itertools.islice(iter(dm.batch_loader("a")), 3))
    again = list(itertools.islice(iter(dm.batch_loader("a")), 3))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    loader, idx = dm.batch_loader("a"), np.arange(8)
    step0, step1 = loader.batch(idx, 0)[0], loader.batch(idx, 8)[0]  # the same images at two stream positions
    assert not torch.equal(step0, step1)
    resumed = iter(dm.batch_loader("a", dm.stream("a", start=2 * 8)))  # a run resumed at step 2
    x, y = next(resumed)
    assert torch.equal(x, first[2][0]) and torch.equal(y, first[2][1])


@pytest.mark.parametrize(("n", "start", "rank", "world"), [(7, 0, 0, 1), (7, 6, 1, 2), (5, 10, 0, 2), (3, 0, 2, 3)])
def test_stream_blocks_are_the_streams_batches(n, start, rank, world):
    stream = DomainStream(n, seed=3, domain="a", start=start, rank=rank, world=world, block=2)
    keys = list(itertools.islice(iter(stream), 10))
    blocks = list(itertools.islice(stream.blocks(), 5))
    assert [(int(i), d) for idx, d0 in blocks for i, d in zip(idx, range(d0, d0 + 2))] == keys
    with pytest.raises(ValueError, match="not a multiple of the block size"):
        next(DomainStream(n, seed=3, domain="a", start=1, block=2).blocks())


def test_digits_shift_matches_the_per_image_pad_and_crop():
    """Each batch image is the per-image pipeline's pad + crop at some offset, and both paths draw offsets
    uniformly on -SHIFT..SHIFT per axis (recovered from a coordinate image, far from the replicated edges)."""
    cfg = DataConfig((32, 32), mean=(0.0,) * 3, std=(1.0,) * 3)
    image = _coordinate_image()
    n = 1800
    augment = BatchAugment(cfg, "digits")
    prepared = augment.prepare(image[None])
    x = torch.cat([augment(prepared, np.zeros(200, np.int64), torch.Generator().manual_seed(s)) for s in range(9)])
    per_image = build_transform(cfg, "digits", train=True)
    y = torch.stack([per_image(image=image)["image"] for _ in range(n)])

    def offsets(batch: torch.Tensor) -> np.ndarray:  # (n, 2): rows and columns the centre pixel moved by
        centre = (batch[:, :2, 16, 16] * 255).round().numpy() / 4
        return centre.astype(int) - 16

    pad = A.PadIfNeeded(32 + 2 * SHIFT, 32 + 2 * SHIFT, border_mode=cv2.BORDER_REPLICATE)(image=image)["image"]
    for k in range(0, n, 97):  # the batch image is exactly the padded image cropped at its offset
        dy, dx = offsets(x[k : k + 1])[0] + SHIFT
        crop = pad[dy : dy + 32, dx : dx + 32].transpose(2, 0, 1).astype(np.float32)
        assert np.array_equal(x[k].numpy(), crop * np.reciprocal(np.float32(255)))  # albumentations' arithmetic
    expected = n / (2 * SHIFT + 1)
    for drawn in (offsets(x), offsets(y)):
        for axis in (0, 1):
            counts = np.bincount(drawn[:, axis] + SHIFT, minlength=2 * SHIFT + 1)
            assert len(counts) == 2 * SHIFT + 1 and counts.min() > 0  # the range -4..4, every value reached
            assert np.abs(counts - expected).max() < 5 * np.sqrt(expected)  # uniform (5 binomial sd)


def _flip_rate(x: torch.Tensor) -> float:
    """Fraction of images whose left-to-right ramp runs right-to-left."""
    return float((x[:, 0, :, -1] - x[:, 0, :, 0]).mean(dim=1).lt(0).double().mean())


def test_imagenet_flip_rate_matches_the_per_image_pipeline():
    """A gray left-to-right ramp: colour jitter and grayscale keep its direction, so only the flip reverses it."""
    ramp = np.repeat(np.repeat(np.linspace(10, 245, 32).astype(np.uint8)[None, :, None], 32, 0), 3, 2)
    cfg = DataConfig((32, 32), mean=(0.0,) * 3, std=(1.0,) * 3)
    n = 1600
    augment = BatchAugment(cfg, "imagenet")
    prepared = augment.prepare(ramp[None])
    x = torch.cat([augment(prepared, np.zeros(400, np.int64), torch.Generator().manual_seed(s)) for s in range(4)])
    per_image = build_transform(cfg, "imagenet", train=True)
    y = torch.stack([per_image(image=ramp)["image"] for _ in range(n)])
    tolerance = 4 * np.sqrt(0.25 / n)  # 4 binomial sd
    assert abs(_flip_rate(x) - 0.5) < tolerance and abs(_flip_rate(y) - 0.5) < tolerance


def test_crop_boxes_follow_albumentations_rule():
    crop = A.RandomResizedCrop(size=(32, 32), scale=(0.7, 1.0))
    for h, w in ((48, 64), (10, 100)):  # a usual image, and one where most attempts fail (centre fallback)
        theirs = np.array(
            [crop.get_params_dependent_on_data({"shape": (h, w)}, {})["crop_coords"] for _ in range(2000)]
        )
        theirs = np.stack([theirs[:, 1], theirs[:, 0], theirs[:, 3] - theirs[:, 1], theirs[:, 2] - theirs[:, 0]], 1)
        ours = crop_boxes(torch.Generator().manual_seed(0), 2000, h, w, (0.7, 1.0), (3 / 4, 4 / 3)).numpy()
        for boxes in (theirs, ours):
            assert (boxes[:, :2] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= h).all()
            assert (boxes[:, 1] + boxes[:, 3] <= w).all()
        area = [b[:, 2] * b[:, 3] / (h * w) for b in (theirs, ours)]
        assert abs(area[0].mean() - area[1].mean()) < 0.01 and abs(area[0].min() - area[1].min()) < 0.02
        assert abs(area[0].max() - area[1].max()) < 0.02


def test_hue_shift_matches_colorsys():
    rng = np.random.default_rng(0)
    rgb = rng.random((5, 3, 4, 4))
    shift = rng.uniform(-0.3, 0.3, 5)
    ours = _shift_hue(torch.from_numpy(rgb), torch.from_numpy(shift).view(5, 1, 1)).numpy()
    expected = np.empty_like(rgb)
    for b, i, j in itertools.product(range(5), range(4), range(4)):
        h, s, v = colorsys.rgb_to_hsv(*rgb[b, :, i, j])
        expected[b, :, i, j] = colorsys.hsv_to_rgb((h + shift[b]) % 1.0, s, v)
    np.testing.assert_allclose(ours, expected, atol=1e-12)


def test_maps_rotations_and_flips_keep_every_pixel():
    """Square crop of the whole image (scale 1, ratio 1), no jitter: each output is one of the 8 symmetries."""
    from dgkit.data.batch_augment import GeometricPolicy

    BATCH_POLICIES["test_symmetries"] = GeometricPolicy(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.5, vflip=0.5,
                                                        rot90=0.5)  # fmt: skip
    POLICIES["test_symmetries"] = POLICIES["none"]
    try:
        cfg = DataConfig((16, 16), mean=(0.0,) * 3, std=(1.0,) * 3)
        augment = BatchAugment(cfg, "test_symmetries")
        image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        x = augment(augment.prepare(image[None]), np.zeros(400, np.int64), torch.Generator().manual_seed(0))
    finally:
        del BATCH_POLICIES["test_symmetries"], POLICIES["test_symmetries"]
    base = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    symmetries = [torch.rot90(t, k, (1, 2)) for t in (base, base.flip(2)) for k in range(4)]
    found = [min(range(8), key=lambda s: float((img - symmetries[s]).abs().max())) for img in x]
    assert all(float((img - symmetries[s]).abs().max()) < 1e-5 for img, s in zip(x, found))
    assert set(found) == set(range(8))  # every rotation and reflection occurs


def test_path_is_chosen_from_the_dataset_type(tmp_path):
    assert _dm().batch_augment and not _dm(batch_augment=False).batch_augment
    tree = folder(write_image_tree(tmp_path / "tree"), verify=False)
    args = dict(test_domains=["night"], data_config=CFG, batch_size=2)
    assert not DGDataModule(tree, **args).batch_augment
    with pytest.raises(ValueError, match="data.batch_augment=true but .* per image"):
        DGDataModule(tree, **args, batch_augment=True)


def test_views_are_independent_draws():
    dm = _dm("digits", views=2)
    x, y = next(iter(dm.train_dataloader()))[0]["a"]
    assert x.shape == (2, 8, 3, 20, 20) and y.shape == (8,) and not torch.equal(x[0], x[1])


def test_per_image_path_still_trains_from_keys():
    dm = _dm("digits", batch_augment=False)
    assert isinstance(dm.train_split("a"), TransformedDataset)
    x, _ = next(iter(dm.train_dataloader()))[0]["a"]
    assert x.shape == (8, 3, 20, 20)


def test_no_augmentation_trains_identically_on_both_paths(tiny_cfg, tmp_path):
    """Records and weights equal with ``data.augment=none``, BSS drawing from torch's global generator included:
    the batch path takes the global draws the per-image loader's iterator takes."""
    from dgkit.run import train

    overrides = ("data.augment=none", "+augment=bss", "augment.bss.seed=null", "trainer.max_steps=3")
    train(tiny_cfg(*overrides, out="batch"))
    train(tiny_cfg(*overrides, "+data.batch_augment=false", out="per_image"))
    records = [(tmp_path / out / "results.jsonl").read_text() for out in ("batch", "per_image")]
    assert records[0] == records[1]
    weights = [torch.load(tmp_path / o / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"] for o in
               ("batch", "per_image")]  # fmt: skip
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
