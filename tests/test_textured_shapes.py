"""scripts/make_textured_shapes.py: the textured folder benchmark behind the transferable defaults (issue 17)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from dgkit.data.benchmarks import folder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import make_textured_shapes as ts  # noqa: E402


def test_tree_reads_as_a_folder_benchmark_and_is_reproducible(tmp_path):
    n = ts.write(tmp_path / "a", per_class=2, seed=3)
    ts.write(tmp_path / "b", per_class=2, seed=3)
    assert n == len(ts.STYLES) * len(ts.CLASSES) * 2
    bench = folder(tmp_path / "a", name="textured_shapes")
    assert sorted(bench.domains) == sorted(ts.STYLES)
    assert bench.classes == sorted(ts.CLASSES)
    image, label = bench.datasets["photo"][0]
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    for f in sorted((tmp_path / "a").rglob("*.png")):
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes()


def test_outlines_have_the_areas_of_their_geometry():
    """Same draws (r, centre, angle) for every class: areas relative to the circle's follow the formulas."""
    area = {k: ts.outline(np.random.default_rng(7), k).sum() for k in ts.CLASSES}
    circle = area["circle"]
    assert area["square"] / circle == pytest.approx(2 / math.pi, rel=0.03)  # 2r² / πr²
    assert area["diamond"] / circle == pytest.approx(2 / math.pi, rel=0.03)
    assert area["hexagon"] / circle == pytest.approx(3 * math.sqrt(3) / (2 * math.pi), rel=0.03)
    assert area["triangle"] / circle == pytest.approx(3 * math.sqrt(3) / (4 * math.pi), rel=0.03)
    assert area["ring"] / circle == pytest.approx(1 - 0.55**2, rel=0.03)


def test_shape_and_background_textures_are_drawn_independently():
    """The class is in the outline only: inside and outside pixels do not share one texture."""
    # flat style: the mean colours inside and outside the outline differ on most draws
    rng = np.random.default_rng(1)
    diffs = []
    for _ in range(20):
        state = rng.bit_generator.state
        mask = ts.outline(rng, "square")
        rng.bit_generator.state = state
        img = ts.render(rng, "flat", "square", size=128).astype(float)
        diffs.append(np.abs(img[mask].mean(0) - img[~mask].mean(0)).max())
    assert np.median(diffs) > 20


def test_unknown_style_and_shape_are_named():
    with pytest.raises(ValueError, match="valid"):
        ts.render(np.random.default_rng(0), "sepia", "square")
    with pytest.raises(ValueError, match="valid"):
        ts.outline(np.random.default_rng(0), "heart")
