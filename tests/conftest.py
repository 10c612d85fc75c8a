"""Shared test helpers: compose the real Hydra config with overrides, tiny CPU settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image

from dgkit.config import register_resolvers

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# A run that takes a few seconds: tiny synthetic data, timm's test ViT, 4 steps, evaluation every 2.
TINY = [
    "data=synthetic",
    "backbone=test_vit",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
    "logger=none",
    "print_summary=false",
]


def compose_cfg(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """Compose ``conf/train.yaml`` as ``train.py`` would, with ``overrides``."""
    register_resolvers()
    extra = [f"output_dir={output_dir}"] if output_dir is not None else []
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=[*overrides, *extra])


@pytest.fixture
def tiny_cfg(tmp_path):
    """Factory: a tiny run config writing to ``tmp_path/run`` (extra overrides appended)."""

    def make(*overrides: str, out: str = "run") -> DictConfig:
        return compose_cfg([*TINY, f"paths.datasets={tmp_path / 'datasets'}", *overrides], tmp_path / out)

    return make


@pytest.fixture
def one_thread():
    """Tiny models (and bit-exact comparisons): one thread, far faster when other jobs load the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_image_tree(root: Path, seed: int = 0, bad: int = 0, per_class: int = 6, size: int = 32) -> Path:
    """A ``root/<domain>/<class>/<i>.png`` tree of random images: domains winter, summer, night; classes cat,
    dog; ``bad`` unreadable ``fake<i>.png`` files added to ``night/cat``."""
    rng = np.random.default_rng(seed)
    for d in ("winter", "summer", "night"):
        for c in ("cat", "dog"):
            (root / d / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / d / c / f"{i}.png")
    for i in range(bad):
        (root / "night" / "cat" / f"fake{i}.png").write_bytes(b"not an image")
    return root


def folder_run_cfg(tmp_path: Path, root: Path, *extra: str) -> DictConfig:
    """A 2-step quick-start run on the folder tree at ``root`` (night held out, test_vit, 32 px) into
    ``tmp_path/run``."""
    overrides = [
        "+exp=quickstart", "data=folder", f"data.root={root}", "data.test_domains=[night]", "data.image_size=32",
        "data.batch_size=4", "data.num_workers=0", "backbone=test_vit", "trainer.max_steps=2",
        "trainer.val_check_interval=2", "trainer.enable_progress_bar=false", "logger=none", "print_summary=false",
        *extra,
    ]  # fmt: skip
    return compose_cfg(overrides, tmp_path / "run")


def tiny_seg_cfg(tmp_path: Path) -> DictConfig:
    """A two-step segmentation run on a 16 px, 3-domain folder tree (``tests/test_seg_data.write_seg_tree``),
    writing to ``tmp_path/run``."""
    from tests.test_seg_data import write_seg_tree

    root = write_seg_tree(tmp_path / "maps", n=6, size=16)
    overrides = [
        "+exp=hist_maps_erm", "data=seg_folder", f"data.root={root}", "data.num_classes=2", "data.test_domains=[c]",
        "data.image_size=16", "data.batch_size=2", "data.num_workers=0", "data.holdout_fraction=0.34",
        "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.enable_progress_bar=false",
        "trainer.accelerator=cpu", "logger=none", "print_summary=false",
    ]  # fmt: skip
    return compose_cfg(overrides, tmp_path / "run")
