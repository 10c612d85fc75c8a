"""``predict.py`` on a segmentation checkpoint: one mask PNG per image (class ids, uint8, at the image's original
size) and a CSV ``path, mask_path``, through the task's prediction records."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dgkit.checkpoint import load_checkpoint
from dgkit.data.transforms import build_transform
from dgkit.predict import data_config_from_meta
from dgkit.run import train
from tests.conftest import ROOT, tiny_seg_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def test_predict_writes_argmax_masks_at_the_original_size(tmp_path):
    train(tiny_seg_cfg(tmp_path))
    root = tmp_path / "maps"  # the tree tiny_seg_cfg wrote
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for i in range(3):  # at the model's input size
        Image.open(root / "c" / "images" / f"t{i}.png").save(images / f"t{i}.png")
    rng = np.random.default_rng(1)  # another size (20x24, H x W) in a sub-folder: resized back
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(images / "sub" / "odd.png")

    spec = importlib.util.spec_from_file_location("predict_script", ROOT / "scripts" / "predict.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    out = tmp_path / "preds.csv"
    assert script.main([f"ckpt={ckpt}", f"images={images}", f"out={out}", "batch_size=3"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["path", "mask_path"]
    assert [Path(r["path"]).name for r in rows] == ["odd.png", "t0.png", "t1.png", "t2.png"]
    assert [Path(r["mask_path"]).relative_to(tmp_path / "preds_masks").as_posix() for r in rows] == [
        "sub/odd.png", "t0.png", "t1.png", "t2.png"
    ]  # fmt: skip

    _, method = load_checkpoint(ckpt)
    model = method.to_inference()
    transform = build_transform(data_config_from_meta(method.meta["data_config"]), "none", train=False)
    for r in rows:
        image = np.asarray(Image.open(r["path"]).convert("RGB"))
        mask = np.asarray(Image.open(r["mask_path"]))
        assert mask.dtype == np.uint8 and mask.shape == image.shape[:2]  # the image's original size
        assert set(np.unique(mask).tolist()) <= {0, 1}
        with torch.no_grad():
            logits = model(transform(image=image)["image"][None])  # the checkpoint's preprocessing, one image
        assert logits.shape == (1, 2, 16, 16)  # the model's input size
        if mask.shape != (16, 16):  # resized back: the logits, bilinearly, then the argmax
            logits = F.interpolate(logits, size=mask.shape, mode="bilinear", align_corners=False)
        assert np.array_equal(mask, logits.argmax(1)[0].numpy())

    # out_dir= puts the masks there; classification records are unchanged (tests/test_foundation.py)
    assert script.main([f"ckpt={ckpt}", f"images={images / 't0.png'}", f"out={out}", f"out_dir={tmp_path / 'm'}"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 1 and Path(rows[0]["mask_path"]) == tmp_path / "m" / "t0.png"


def test_segmentation_records_resize_logits_then_take_the_argmax():
    from dgkit.tasks.segmentation import Segmentation

    logits = torch.randn(2, 3, 4, 4)
    records = Segmentation().prediction_records(logits, [(4, 4), (8, 6)], ["bg", "line", "area"])
    assert [list(r) for r in records] == [["mask"], ["mask"]]
    assert np.array_equal(records[0]["mask"], logits[0].argmax(0).numpy().astype(np.uint8))
    resized = F.interpolate(logits[1:], size=(8, 6), mode="bilinear", align_corners=False).argmax(1)[0]
    assert records[1]["mask"].shape == (8, 6) and np.array_equal(records[1]["mask"], resized.numpy())
