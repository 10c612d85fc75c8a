"""DomainBed splits: deterministic, keyed on (seed, domain), independent of the held-out domain."""

import numpy as np
import pytest

from dgkit.data.benchmark import eval_splits, resolve_test_domains, split_indices


def test_split_sizes_and_disjoint():
    inn, out = split_indices(103, seed=0, domain="a", holdout_fraction=0.2)
    assert len(out) == 20  # floor(0.2 * 103)
    assert len(inn) == 83
    assert set(inn).isdisjoint(out)
    assert sorted(np.concatenate([inn, out]).tolist()) == list(range(103))


def test_split_deterministic_and_keyed():
    a1 = split_indices(200, 0, "photo")
    a2 = split_indices(200, 0, "photo")
    assert all(np.array_equal(x, y) for x, y in zip(a1, a2))
    assert not np.array_equal(split_indices(200, 1, "photo")[1], a1[1])  # new trial seed, new split
    assert not np.array_equal(split_indices(200, 0, "ink")[1], a1[1])  # each domain its own shuffle


def test_bad_holdout_fraction():
    with pytest.raises(ValueError, match="holdout_fraction"):
        split_indices(10, 0, "a", 1.0)


def test_eval_order():
    assert eval_splits(["a", "b"]) == [("a", "in"), ("a", "out"), ("b", "in"), ("b", "out")]


def test_resolve_test_domains():
    domains = ["ink", "photo", "font"]
    assert resolve_test_domains(["photo"], domains) == ["photo"]
    assert resolve_test_domains([2], domains) == ["font"]
    assert resolve_test_domains("ink", domains) == ["ink"]
    with pytest.raises(ValueError, match=r"unknown domain 'paint'.*'ink', 'photo', 'font'"):
        resolve_test_domains(["paint"], domains)
    with pytest.raises(ValueError, match="holds out every domain"):
        resolve_test_domains(domains, domains)
