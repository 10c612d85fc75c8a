"""The decoded-image cache of folder benchmarks (issue 17 §4): ``scripts/prepare_cache.py`` and ``data.cache``."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from dgkit.data.folder import CACHE_INDEX, CachedImageDataset, cache_dir, folder_benchmark
from dgkit.run import train
from tests.conftest import compose_cfg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import prepare_cache  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _tree(root: Path, n: int = 4, side: int = 16) -> Path:
    """2 domains x 2 classes x ``n`` images: JPEGs and PNGs, square (``side``) and not (``side`` x 1.5 ``side``)."""
    rng = np.random.default_rng(0)
    for d in ("d1", "d2"):
        for c in ("cat", "dog"):
            (root / d / c).mkdir(parents=True)
            for i in range(n):
                h, w = (side, side) if i % 2 else (side, side * 3 // 2)
                coarse = Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
                coarse.save(root / d / c / f"{i}.{'jpg' if i % 2 else 'png'}")
    return root


def _expected(path: Path, size: int) -> np.ndarray:
    """An independent decode (PIL) and resize (OpenCV, area averaging) of one file."""
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB"))
    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)


def test_cache_holds_each_files_decoded_resized_pixels_in_the_benchmarks_order(tmp_path):
    root = _tree(tmp_path / "tree")
    folder = prepare_cache.build_cache(root, size=12, workers=2)
    assert folder == cache_dir(root, 12)
    assert sorted(p.name for p in folder.iterdir()) == ["d1.npy", "d2.npy", "index.json"]
    plain, cached = folder_benchmark(root), folder_benchmark(root, cache=12)
    assert cached.domains == plain.domains and cached.classes == plain.classes
    assert cached.fingerprint == plain.fingerprint  # the same data: a cached run compares like an uncached one
    index = json.loads((folder / CACHE_INDEX).read_text())
    assert index["fingerprint"] == plain.fingerprint and index["size"] == 12
    for d in plain.domains:
        files = list(plain.datasets[d].files)
        assert index["domains"][d]["paths"] == [Path(f).relative_to(root).as_posix() for f in files]
        assert np.array_equal(cached.datasets[d].labels, plain.datasets[d].labels)
        for i, f in enumerate(files):
            image, label = cached.datasets[d][i]
            assert image.shape == (12, 12, 3) and image.dtype == np.uint8 and label == plain.datasets[d][i][1]
            assert np.array_equal(image, _expected(Path(f), 12)), f
    image[:] = 0  # an item is a private, writable copy
    assert cached.datasets["d2"][len(files) - 1][0].any()


def test_dataset_maps_its_file_per_process_and_pickles_without_pixels(tmp_path):
    root = _tree(tmp_path / "tree")
    prepare_cache.build_cache(root, size=12)
    dataset = folder_benchmark(root, cache=12).datasets["d1"]
    assert isinstance(dataset, CachedImageDataset)
    first = dataset[0][0]
    shipped = pickle.dumps(dataset)  # what a spawned loader worker receives
    assert len(shipped) < 4096 and pickle.loads(shipped)._images is None
    assert np.array_equal(pickle.loads(shipped)[0][0], first)
    dataset._pid = -1  # as in a forked worker: another process id maps the file again
    assert np.array_equal(dataset[0][0], first) and dataset._pid == os.getpid()


@pytest.mark.parametrize("change", ["add", "edit_in_place", "remove"])
def test_a_stale_cache_names_the_rebuild_command(tmp_path, change):
    root = _tree(tmp_path / "tree")
    prepare_cache.build_cache(root, size=12)
    target = root / "d2" / "dog" / "1.jpg"
    if change == "add":
        shutil.copy(target, root / "d2" / "dog" / "9.jpg")
    elif change == "remove":
        target.unlink()
    else:  # the same byte size (the benchmark fingerprint cannot tell), a newer modification time
        data = bytearray(target.read_bytes())
        data[-3] ^= 0xFF
        target.write_bytes(bytes(data))
        os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    stale = rf"(?s)is stale: domain\(s\) \['d2'\].*prepare_cache\.py {root} --size 12"
    with pytest.raises(FileNotFoundError, match=stale):
        folder_benchmark(root, cache=12)
    folder_benchmark(root, cache=12, domains=["d1"])  # an unchanged domain still reads


def test_missing_or_other_size_cache_is_refused(tmp_path):
    root = _tree(tmp_path / "tree")
    with pytest.raises(FileNotFoundError, match=r"(?s)does not exist \(built: \[\]\).*prepare_cache\.py .* --size 12"):
        folder_benchmark(root, cache=12)
    prepare_cache.build_cache(root, size=12)
    with pytest.raises(FileNotFoundError, match=r"(?s)/16 does not exist \(built: \['12'\]\).*--size 16"):
        folder_benchmark(root, cache=16)


def test_an_interrupted_build_is_never_used(tmp_path, monkeypatch):
    root = _tree(tmp_path / "tree")
    prepare_cache.build_cache(root, size=12)
    (cache_dir(root, 12) / CACHE_INDEX).unlink()  # as if the build stopped before its last write
    with pytest.raises(FileNotFoundError, match=r"(?s)is incomplete \(an interrupted build: no index\).*--size 12"):
        folder_benchmark(root, cache=12)

    def fail(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_cache, "_fill", fail)
    with pytest.raises(KeyboardInterrupt):
        prepare_cache.build_cache(root, size=14)
    assert not cache_dir(root, 14).exists() and not list(cache_dir(root, 14).parent.glob(".building-*"))


def test_unreadable_images_are_left_out_with_skip_and_refused_with_error(tmp_path):
    root = _tree(tmp_path / "tree")
    (root / "d1" / "cat" / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"(?s)1 unreadable image\(s\).*bad\.png.*--on-bad-image skip"):
        prepare_cache.build_cache(root, size=12)
    prepare_cache.build_cache(root, size=12, on_bad_image="skip")
    plain = folder_benchmark(root, verify=True, on_bad_image="skip")
    cached = folder_benchmark(root, verify=True, on_bad_image="skip", cache=12)
    assert cached.skipped == plain.skipped and cached.fingerprint == plain.fingerprint
    assert np.array_equal(cached.datasets["d1"].labels, plain.datasets["d1"].labels)
    with pytest.raises(ValueError, match=r"(?s)bad\.png: could not be decoded.*data\.on_bad_image=skip"):
        folder_benchmark(root, cache=12)


def _run_cfg(tmp_path: Path, root: Path, *extra: str):
    overrides = [
        "+exp=quickstart", "data=folder", f"data.root={root}", "data.test_domains=[d2]", "data.image_size=16",
        "data.batch_size=4", "data.num_workers=0", "data.holdout_fraction=0.25", "data.augment=imagenet",
        "backbone=test_vit", "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.enable_progress_bar=false",
        "logger=none", "print_summary=false", *extra,
    ]  # fmt: skip
    return compose_cfg(overrides, tmp_path / "run")


def test_a_cached_run_trains_and_is_never_resumed_from_an_uncached_folder(tmp_path):
    root = _tree(tmp_path / "tree", n=4, side=16)
    prepare_cache.build_cache(root, size=16)
    final = train(_run_cfg(tmp_path, root, "data.cache=16"))
    assert final["last_step"] == 2
    run_json = tmp_path / "run" / "run.json"
    record = json.loads(run_json.read_text())
    assert record["data_cache"] == "16px" and record["augment_path"] == "per_image"
    with pytest.raises(ValueError, match=r"data_cache: 16px there, none now"):
        train(_run_cfg(tmp_path, root))
    del record["data_cache"]  # a run.json from before the cache: it decoded its files
    run_json.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"data_cache: none there, 16px now"):
        train(_run_cfg(tmp_path, root, "data.cache=16"))
    assert train(_run_cfg(tmp_path, root))["last_step"] == 2  # the uncached command is the same run: skipped


def test_bench_loader_times_the_cached_arm_beside_the_decoding_ones(tmp_path, capsys):
    import bench_loader

    root = bench_loader.write_tree(tmp_path / "tree", images=60, classes=2)
    args = ["--part", "folder", "--tree", str(root), "--images", "60", "--size", "32", "--workers", "0", "--cache"]
    out = bench_loader.main([*args, "40", "--folder-batch", "2", "--folder-steps", "1", "--repeats", "1"])["folder"]
    assert set(out) == {("dgkit", 0), ("ImageFolder", 0), ("dgkit cached", 0)} and all(min(v) > 0 for v in out.values())
    assert "### Decoded cache: data.cache=40 (built in" in capsys.readouterr().out
    assert folder_benchmark(root, cache=40).datasets["real"][0][0].shape == (40, 40, 3)
