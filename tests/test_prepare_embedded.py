"""scripts/prepare_embedded.py draws sample grids only when asked: a plain run (``make data``) must not rewrite
the tracked ``docs/img/*_samples.png`` (issue 19, item 4)."""

from __future__ import annotations

import hashlib
import importlib.util
import sys

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("prepare_embedded_script", ROOT / "scripts" / "prepare_embedded.py")
prepare = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = prepare
spec.loader.exec_module(prepare)


def _docs_img() -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((ROOT / "docs" / "img").glob("*"))}


def test_default_run_writes_no_grid_and_grid_flag_does(tmp_path, monkeypatch) -> None:
    before = _docs_img()
    monkeypatch.chdir(ROOT)  # the old default, docs/img, was relative to the working directory
    prepare.main(["--root", str(tmp_path / "data"), "--n-per-domain", "20", "--hist-maps-per-domain", "4"])
    assert _docs_img() == before
    assert not list(tmp_path.rglob("*.png"))

    prepare.main(
        [
            "--root",
            str(tmp_path / "data"),
            "--n-per-domain",
            "20",
            "--hist-maps-per-domain",
            "4",
            "--grid",
            str(tmp_path / "img"),
        ]
    )
    assert sorted(p.name for p in (tmp_path / "img").iterdir()) == [
        "digits_dg_samples.png",
        "hist_maps_samples.png",
        "rotated_digits_samples.png",
    ]
    assert _docs_img() == before
