"""Embedded benchmarks: deterministic generation, shapes and labels, RotatedMNIST protocol, the cache."""

from __future__ import annotations

import json
import logging
import threading
import time

import numpy as np
import pytest

from dgkit.data.embedded import digits_dg, rotated_digits, synthetic
from dgkit.data.embedded.cache import array_checksum, load_or_generate, read_manifest

N = 40


@pytest.fixture(scope="module")
def digits():
    return digits_dg.generate(n_per_domain=N, seed=0)


@pytest.fixture(scope="module")
def rotated():
    return rotated_digits.generate(seed=0)


def _checksums(arrays):
    return {d: array_checksum(x, y) for d, (x, y) in arrays.items()}


# ------------------------------------------------------------------------------------------- digits_dg


def test_digits_dg_shapes_and_labels(digits):
    assert tuple(digits) == digits_dg.DOMAINS == ("ink", "photo", "font", "street")
    for d, (x, y) in digits.items():
        assert x.shape == (N, 32, 32, 3) and x.dtype == np.uint8, d
        assert y.shape == (N,) and y.dtype == np.int64, d
        assert y.min() >= 0 and y.max() <= 9, d
        assert x.std() > 20, f"{d} images look blank"
    for d in ("font", "street"):  # typeset domains are exactly balanced
        assert np.bincount(digits[d][1], minlength=10).tolist() == [N // 10] * 10


def test_digits_dg_handwritten_domains_cover_every_class():
    arrays = digits_dg.generate(n_per_domain=100, seed=0)
    for d in ("ink", "photo"):
        assert set(arrays[d][1].tolist()) == set(range(10)), d


def test_digits_dg_deterministic(digits):
    again = digits_dg.generate(n_per_domain=N, seed=0)
    assert _checksums(again) == _checksums(digits)
    other = _checksums(digits_dg.generate(n_per_domain=N, seed=1))
    assert all(other[d] != c for d, c in _checksums(digits).items())


def test_digits_dg_domains_differ_in_style(digits):
    mean = {d: x.reshape(-1, 3).mean(0) for d, (x, _) in digits.items()}
    assert mean["ink"].min() > 170  # light paper
    # ink is nearly grey, the other three are colourful; no two domains share their colour statistics
    assert np.ptp(mean["ink"]) < 20
    stats = {d: np.concatenate([x.reshape(-1, 3).mean(0), x.reshape(-1, 3).std(0)]) for d, (x, _) in digits.items()}
    for i, a in enumerate(digits_dg.DOMAINS):
        for b in digits_dg.DOMAINS[i + 1 :]:
            assert np.abs(stats[a] - stats[b]).max() > 10, (a, b)


# -------------------------------------------------------------------------------------- rotated_digits


def test_rotated_digits_protocol(rotated):
    from sklearn.datasets import load_digits

    target = load_digits().target
    split = rotated_digits.split_indices(seed=0)
    assert tuple(rotated) == tuple(split) == ("0", "15", "30", "45", "60", "75")
    everything = np.concatenate(list(split.values()))
    assert len(everything) == len(set(everything.tolist())) == 1797  # disjoint and complete
    for d, (x, y) in rotated.items():
        assert x.shape == (len(split[d]), 28, 28, 3) and x.dtype == np.uint8
        assert 299 <= len(x) <= 300
        assert np.array_equal(x[..., 0], x[..., 1]) and np.array_equal(x[..., 0], x[..., 2])
        assert np.array_equal(y, target[split[d]])
        assert x[:, 0, 0].max() == 0 and x.max() > 200  # white digit on black
    assert rotated_digits.split_indices(seed=1)["0"].tolist() != split["0"].tolist()


def test_rotated_digits_angles_match_an_independent_rotation(rotated):
    """Rebuild each image with scikit-image from its source digit; the best-matching angle is the domain's."""
    from skimage.transform import resize, rotate
    from sklearn.datasets import load_digits

    images = load_digits().images
    split = rotated_digits.split_indices(seed=0)
    candidates = np.arange(-90, 91, 15)
    for d, (x, _) in rotated.items():
        scores = np.zeros(len(candidates))
        for j in range(5):
            frame = np.zeros((28, 28))
            frame[4:24, 4:24] = resize(images[split[d][j]] / 16.0, (20, 20), order=3)
            got = x[j, ..., 0].astype(float).ravel()
            for k, angle in enumerate(candidates):  # skimage rotates counter-clockwise for positive angles
                scores[k] += np.corrcoef(rotate(frame, angle, order=1).ravel(), got)[0, 1]
        assert candidates[scores.argmax()] == int(d), (d, dict(zip(candidates.tolist(), (scores / 5).round(2))))
        assert scores.max() / 5 > 0.9


# ------------------------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_deterministic_balanced():
    a = synthetic.generate(n_per_domain=30, size=12, num_classes=3, seed=0)
    assert tuple(a) == ("a", "b", "c")
    for x, y in a.values():
        assert x.shape == (30, 12, 12, 3) and x.dtype == np.uint8 and y.dtype == np.int64
        assert np.bincount(y).tolist() == [10, 10, 10]
    assert _checksums(a) == _checksums(synthetic.generate(n_per_domain=30, size=12, num_classes=3, seed=0))
    assert _checksums(a) != _checksums(synthetic.generate(n_per_domain=30, size=12, num_classes=3, seed=1))
    assert set(synthetic.generate(n_per_domain=20, num_classes=5)["b"][1].tolist()) == set(range(5))


def test_synthetic_learnable_in_a_few_dozen_steps():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: extra threads only add contention

    def tensors(arrays, domains):
        x = np.concatenate([arrays[d][0] for d in domains])
        y = np.concatenate([arrays[d][1] for d in domains])
        return torch.tensor(x).permute(0, 3, 1, 2).float() / 255, torch.tensor(y)

    x, y = tensors(synthetic.generate(seed=0), ["a", "b"])
    fresh_x, fresh_y = tensors(synthetic.generate(seed=1), ["a", "b"])
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 3),
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(60):
        i = torch.randint(0, len(x), (32,))
        loss = nn.functional.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (model(fresh_x).argmax(1) == fresh_y).float().mean().item()
    torch.set_num_threads(threads)
    assert acc > 0.6  # chance is 1/3


# ----------------------------------------------------------------------------------------------- cache


class _Gen:
    """A tiny generator that counts its calls."""

    def __init__(self, domains=("z", "a"), n=5, delay=0.0):
        self.domains, self.n, self.delay, self.calls = domains, n, delay, 0

    def __call__(self):
        self.calls += 1
        time.sleep(self.delay)
        rng = np.random.default_rng(0)
        return {
            d: (rng.integers(0, 256, (self.n, 4, 4, 3), dtype=np.uint8), np.arange(self.n) % 2) for d in self.domains
        }


def _mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_cache_generates_once_then_loads(tmp_path):
    gen = _Gen()
    first = load_or_generate("toy", tmp_path, gen, "1", {"n": 5})
    folder = tmp_path / "toy"
    assert gen.calls == 1 and sorted(p.name for p in folder.iterdir()) == ["a.npz", "manifest.json", "z.npz"]
    before = _mtimes(folder)
    second = load_or_generate("toy", tmp_path, gen, "1", {"n": 5})
    assert gen.calls == 1 and _mtimes(folder) == before
    assert list(second) == list(first) == ["z", "a"]  # the generator's order, not sorted
    for d in first:
        assert np.array_equal(first[d][0], second[d][0]) and second[d][1].dtype == np.int64
    manifest = read_manifest("toy", tmp_path)
    assert manifest["name"] == "toy" and manifest["version"] == "1" and manifest["params"] == {"n": 5}
    assert manifest["domains"] == ["z", "a"] and manifest["counts"] == {"z": 5, "a": 5}
    assert manifest["checksums"] == _checksums(first) and manifest["created_at"]


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "delete", "version", "params", "manifest"])
def test_cache_regenerates_when_stale_or_damaged(tmp_path, caplog, damage):
    gen = _Gen()
    good = load_or_generate("toy", tmp_path, gen, "1", {"n": 5})
    folder = tmp_path / "toy"
    version, params = "1", {"n": 5}
    if damage == "corrupt":  # same size, different pixels: only the checksum notices
        arrays = {k: v.copy() for k, v in np.load(folder / "a.npz").items()}
        arrays["images"][0, 0, 0, 0] ^= 1
        np.savez(folder / "a.npz", **arrays)
    elif damage == "truncate":
        (folder / "z.npz").write_bytes((folder / "z.npz").read_bytes()[:50])
    elif damage == "delete":
        (folder / "a.npz").unlink()
    elif damage == "version":
        version = "2"
    elif damage == "params":
        params = {"n": 6}
    else:
        (folder / "manifest.json").write_text("{not json")
    with caplog.at_level(logging.INFO, logger="dgkit.data.embedded.cache"):
        again = load_or_generate("toy", tmp_path, gen, version, params)
    assert gen.calls == 2
    assert [r.getMessage() for r in caplog.records if "generating" in r.getMessage()], "no log line saying why"
    assert _checksums(again) == _checksums(good)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["version"] == version and manifest["params"] == params
    load_or_generate("toy", tmp_path, gen, version, params)
    assert gen.calls == 2  # repaired: the next load reads the cache


def test_cache_concurrent_generation_leaves_a_valid_cache(tmp_path):
    gens = [_Gen(delay=0.05), _Gen(delay=0.05)]
    results = [None, None]

    def run(i):
        results[i] = load_or_generate("toy", tmp_path, gens[i], "1", {})

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _checksums(results[0]) == _checksums(results[1])
    assert not [p for p in (tmp_path / "toy").iterdir() if p.name.endswith(".tmp")]
    calls = sum(g.calls for g in gens)
    load_or_generate("toy", tmp_path, gens[0], "1", {})
    assert sum(g.calls for g in gens) == calls  # whatever interleaving, the cache is consistent


def test_cache_rejects_bad_generator_output(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        load_or_generate("bad", tmp_path, lambda: {"a": (np.zeros((2, 4, 4, 3)), np.zeros(2))}, "1", {})
    with pytest.raises(ValueError, match="labels"):
        load_or_generate("bad", tmp_path, lambda: {"a": (np.zeros((2, 4, 4, 3), np.uint8), np.zeros(3))}, "1", {})


def test_loaders_cache_on_disk(tmp_path):
    arrays = digits_dg.load(tmp_path, n_per_domain=10, seed=0)
    assert _checksums(arrays) == _checksums(digits_dg.generate(n_per_domain=10, seed=0))
    manifest = read_manifest("digits_dg", tmp_path)
    assert manifest["params"] == {"n_per_domain": 10, "seed": 0} and manifest["version"] == digits_dg.VERSION
    assert manifest["counts"] == {d: 10 for d in digits_dg.DOMAINS}
    rot = rotated_digits.load(tmp_path, seed=0)
    assert read_manifest("rotated_digits", tmp_path)["counts"] == {d: len(y) for d, (_, y) in rot.items()}
    assert sum(len(y) for _, y in rot.values()) == 1797
