"""The folder benchmark on trees written by the test, including every error case."""

import numpy as np
import pytest
from PIL import Image

from dgkit.data.folder import folder_benchmark


def _tree(root, domains=("d1", "d2"), classes=("cat", "dog"), n=3):
    for d in domains:
        for c in classes:
            (root / d / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(np.full((8, 10, 3), 40 * i, np.uint8)).save(root / d / c / f"{i}.png")
    return root


def test_discovers_domains_and_classes(tmp_path):
    b = folder_benchmark(_tree(tmp_path, domains=("zeta", "alpha")))
    assert b.domains == ["alpha", "zeta"]
    assert b.classes == ["cat", "dog"]
    image, label = b.datasets["alpha"][4]
    assert image.shape == (8, 10, 3) and image.dtype == np.uint8 and label == 1


def test_named_domains_keep_order(tmp_path):
    b = folder_benchmark(_tree(tmp_path, domains=("b", "a")), domains=["b", "a"])
    assert b.domains == ["b", "a"]


def test_missing_root_shows_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)no folder at .*nope.*expected layout"):
        folder_benchmark(tmp_path / "nope")


def test_missing_domain_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)missing domain folders .*sketch.*expected layout"):
        folder_benchmark(_tree(tmp_path), domains=["d1", "sketch"])


def test_class_mismatch_named(tmp_path):
    _tree(tmp_path, domains=("d1",), classes=("cat", "dog"))
    _tree(tmp_path, domains=("d2",), classes=("cat",))
    with pytest.raises(ValueError, match=r"d2 lacks class folders \['dog'\]"):
        folder_benchmark(tmp_path)


def test_unreadable_image_names_file(tmp_path):
    b_root = _tree(tmp_path)
    bad = b_root / "d1" / "cat" / "0.png"
    bad.write_bytes(b"not a png")
    b = folder_benchmark(b_root)
    with pytest.raises(RuntimeError, match=r"cannot read image .*d1/cat/0\.png"):
        b.datasets["d1"][0]


def test_empty_domain(tmp_path):
    _tree(tmp_path, domains=("d1",))
    (tmp_path / "d2" / "cat").mkdir(parents=True)
    (tmp_path / "d2" / "dog").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no image files under"):
        folder_benchmark(tmp_path)
