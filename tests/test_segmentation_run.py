"""A tiny segmentation run trains end to end with ``dgkit.run.train`` on a segmentation folder, writes
``miou/<domain>/<split>`` records, and ``scripts/collect_results.py`` makes its mIoU table."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from dgkit.run import train
from dgkit.utils.io import read_jsonl
from tests.conftest import ROOT, compose_cfg, tiny_seg_cfg
from tests.test_seg_data import write_seg_tree

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_segmentation_run_records_miou_and_collects(tmp_path, capsys):
    train(tiny_seg_cfg(tmp_path))
    records = read_jsonl(tmp_path / "run" / "results.jsonl")
    keys = {k for r in records for k in r if k.startswith("miou/")}
    assert keys >= {f"miou/{d}/{s}" for d in "abc" for s in ("in", "out")}
    assert not any(k.startswith("acc/") for r in records for k in r)
    assert all(0.0 <= r[k] <= 1.0 for r in records for k in keys if k in r)

    # the secondary scores of the same evaluation, checked against their equations in the per-class IoUs
    for r in records:
        for d in "abc":
            for split in ("in", "out"):
                ious = [r[f"iou_{c}/{d}/{split}"] for c in (0, 1)]
                present = [v for v in ious if not math.isnan(v)]
                assert r[f"miou/{d}/{split}"] == pytest.approx(sum(present) / len(present), abs=1e-6)
                dice = [2 * v / (1 + v) for v in present]  # Dice = 2 IoU / (1 + IoU), class by class
                assert r[f"dice/{d}/{split}"] == pytest.approx(sum(dice) / len(dice), abs=1e-6)
                if not math.isnan(ious[1]):  # foreground F1 is the foreground Dice
                    assert r[f"f1/{d}/{split}"] == pytest.approx(2 * ious[1] / (1 + ious[1]), abs=1e-6)
                assert 0.0 <= r[f"precision/{d}/{split}"] <= 1.0 and 0.0 <= r[f"recall/{d}/{split}"] <= 1.0
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert set(final["secondary_scores"]) == {"dice", "iou_0", "iou_1", "precision", "recall", "f1"}
    assert set(final["secondary_scores"]["dice"]) == set("abc")

    spec = importlib.util.spec_from_file_location("collect_results", ROOT / "scripts" / "collect_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    assert module.main([str(tmp_path / "run"), "--out", str(tmp_path / "tables")]) == 0
    table = capsys.readouterr().out
    assert "mIoU" in table and "accuracy" not in table


def test_dann_on_segmentation_is_refused_at_build(tmp_path):
    root = write_seg_tree(tmp_path / "maps", n=4, size=16)
    cfg = compose_cfg(
        ["+exp=hist_maps_erm", "data=seg_folder", f"data.root={root}", "data.num_classes=2", "data.test_domains=[c]",
         "method=dann", "data.holdout_fraction=0.5", "logger=none", "print_summary=false"],
        tmp_path / "run",
    )  # fmt: skip
    with pytest.raises(Exception, match="DANN is not defined for task=segmentation"):
        train(cfg)
