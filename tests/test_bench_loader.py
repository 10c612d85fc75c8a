"""scripts/bench_loader.py on tiny inputs, and the packed file list it measures (issue 17 §4, issue 19 item 1)."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dgkit.data.folder import PathTable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench_loader  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_path_table_round_trips_paths():
    paths = [Path("/data/tree/a/cat/1.jpg"), Path("/data/tree/b/dog/é 2.png"), Path("/data/x.jpg")]
    table = PathTable(paths)
    assert list(table) == [str(p) for p in paths] and table[-1] == str(paths[-1]) and len(table) == 3
    assert table.prefix == "/data/" and table.nbytes == len("tree/a/cat/1.jpgtree/b/dog/é 2.pngx.jpg".encode()) + 32
    with pytest.raises(IndexError, match="out of range for 3 files"):
        table[3]
    assert list(PathTable([])) == [] and list(PathTable(["rel/a.png", "/abs/b.png"])) == ["rel/a.png", "/abs/b.png"]


def _private_kb_after_touching(files) -> int:
    """In a forked child: private memory (kB) gained by reading every entry of ``files`` once."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: what a loader worker does over one pass
        gc.disable()  # a collection would touch every object of this (large) test process, hiding the effect
        before = bench_loader.memory_kb(os.getpid())["uss"]
        total = sum(len(str(f)) for f in files)
        after = bench_loader.memory_kb(os.getpid())["uss"]
        os.write(write, f"{after - before} {total}".encode())
        os._exit(0)
    os.waitpid(pid, 0)
    grown, _ = os.read(read, 64).split()
    os.close(read), os.close(write)
    return int(grown)


def _domainnet_like(n: int, packed: bool):
    paths = [Path(f"/data/domainnet/real/class_{i % 345:03d}/real_{i:06d}.jpg") for i in range(n)]
    return PathTable(paths) if packed else paths  # the list is garbage once the table is built


def test_workers_copy_a_list_of_paths_but_not_the_packed_table():
    as_list = _private_kb_after_touching(_domainnet_like(30_000, packed=False))
    packed = _private_kb_after_touching(_domainnet_like(30_000, packed=True))
    assert as_list > 2000  # every Path's page is written (reference counts) and copied: tens of bytes per path
    assert packed < as_list / 4


def test_in_memory_part_times_the_same_batches(tmp_path):
    args = ["--part", "in-memory", "--steps", "2", "--warmup", "1", "--models", "small_cnn_lite", "--model-steps"]
    overrides = ["data=synthetic", "data.test_domains=[c]", "data.augment=digits", f"paths.datasets={tmp_path}"]
    out = bench_loader.main([*args, "1", "--model-warmup", "0", "--batch-size", "4", *overrides])["in_memory"]
    assert out["images_per_step"] == 2 * 4 and out["shape"] == (3, 16, 16)
    assert set(out["loader"]) == {"dgkit (batch tensors)", "per-image albumentations", "x[idx] (DomainBed)"}
    assert all(t["cpu_ms"] > 0 for t in out["loader"].values()) and out["model_ms"]["small_cnn_lite"] > 0


def test_indexing_baseline_draws_dgkits_images():
    from dgkit.backbones.base import DataConfig
    from dgkit.data import DGDataModule
    from dgkit.data.benchmarks import synthetic

    dm = DGDataModule(synthetic(), test_domains=["c"], data_config=DataConfig((16, 16)), batch_size=5)
    plain = next(bench_loader.indexing_loader(dm))
    ours = next(iter(dm.train_dataloader()))[0]
    for d in ("a", "b"):
        assert torch.equal(plain[d][1], ours[d][1]) and torch.equal(plain[d][0], ours[d][0])  # augment=none


def test_folder_part_compares_loaders_on_a_written_tree(tmp_path):
    root = bench_loader.write_tree(tmp_path / "tree", images=60, classes=2)
    files = sorted(root.rglob("*.jpg"))
    assert len(files) == 60 and {f.parts[-3] for f in files} == set(bench_loader.TREE_DOMAINS)
    args = ["--part", "folder", "--tree", str(root), "--images", "60", "--size", "32", "--workers", "0"]
    out = bench_loader.main([*args, "--folder-batch", "2", "--folder-steps", "1", "--repeats", "1"])["folder"]
    assert set(out) == {("dgkit", 0), ("ImageFolder", 0)} and all(min(v) > 0 for v in out.values())
    x, y = next(bench_loader.imagefolder_loader(root, ["clipart", "real"], 32, 2, 0))
    assert x.shape == (4, 3, 32, 32) and y.shape == (4,)  # 2 per domain, as dgkit's step


def test_memory_fields_are_consistent():
    m = bench_loader.memory_kb(os.getpid())
    assert 0 < m["uss"] <= m["rss"] and 0 < m["pss"] <= m["rss"]
    assert np.isfinite(list(m.values())).all()


@pytest.mark.parametrize(
    ("mode", "options"),
    [("RGB", {"subsampling": 2}), ("RGB", {"subsampling": 0}), ("RGB", {"subsampling": 1, "quality": 50}),
     ("RGB", {"progressive": True}), ("L", {}), ("CMYK", {}), ("RGB", {"orientation": 6})],
)  # fmt: skip
def test_jpeg_decode_gives_pils_pixels(tmp_path, mode, options):
    """dgkit decodes JPEGs with OpenCV (faster); the pixels are PIL's, EXIF orientation ignored as PIL does."""
    from PIL import Image

    from dgkit.data.folder import read_image

    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).resize((47, 33), Image.BICUBIC)
    noisy = np.clip(np.asarray(coarse).astype(int) + rng.integers(-20, 21, (33, 47, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(noisy).convert(mode)
    options = dict(options)
    if "orientation" in options:
        exif = Image.Exif()
        exif[0x0112] = options.pop("orientation")
        options["exif"] = exif.tobytes()
    image.save(tmp_path / "x.jpg", **options)
    with Image.open(tmp_path / "x.jpg") as img:
        expected = np.asarray(img.convert("RGB"))
    assert np.array_equal(read_image(tmp_path / "x.jpg"), expected)
