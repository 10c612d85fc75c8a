"""A tiny segmentation run trains end to end with ``dgkit.run.train`` on a segmentation folder, writes
``miou/<domain>/<split>`` records, and ``scripts/collect_results.py`` makes its mIoU table."""

from __future__ import annotations

import importlib.util

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
