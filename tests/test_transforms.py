"""Pipelines come from the backbone's data config."""

import numpy as np
import pytest
import torch

from dgkit.backbones.base import DataConfig
from dgkit.data.transforms import build_transform


def test_eval_pipeline_resizes_and_normalises():
    cfg = DataConfig(input_size=(8, 8), mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    image = np.full((4, 4, 3), 51, np.uint8)  # 0.2 after /255
    out = build_transform(cfg, "digits", train=False)(image=image)["image"]
    assert out.shape == (3, 8, 8) and out.dtype == torch.float32
    expected = torch.tensor([(0.2 - 0.5) / 0.5, (0.2 - 0.25) / 0.25, (0.2 - 0.0) / 1.0])
    torch.testing.assert_close(out.mean(dim=(1, 2)), expected, atol=1e-5, rtol=0)


def test_train_pipeline_augments():
    cfg = DataConfig(input_size=(32, 32))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    t = build_transform(cfg, "imagenet", train=True)
    a, b = t(image=image)["image"], t(image=image)["image"]
    assert a.shape == (3, 32, 32) and not torch.equal(a, b)


def test_unknown_policy():
    with pytest.raises(ValueError, match=r"data.augment='fancy'.*\['digits', 'imagenet', 'maps', 'none'\]"):
        build_transform(DataConfig(), "fancy")
