"""TopK against a brute-force sort by (value desc, index asc)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nethook.stats import from_state_dict
from nethook.stats.topk import TopK

SETTINGS = settings(max_examples=40, deadline=None)


def brute_force(x: np.ndarray, index: np.ndarray, k: int, largest: bool = True):
    """Per column: the k best (value, index) pairs, ties to the smaller index."""
    values, indices = [], []
    for c in range(x.shape[1]):
        col = x[:, c].astype(np.float64)
        key = np.where(np.isnan(col), -np.inf, col if largest else -col)
        order = np.lexsort((index, -key))[:k]
        values.append(col[order])
        indices.append(index[order])
    return np.array(values), np.array(indices)


def tie_heavy(rng: np.random.Generator, n: int, c: int) -> np.ndarray:
    """ReLU-like data: many exact zeros and repeated small integers."""
    x = rng.integers(-3, 4, size=(n, c)).astype(np.float32)
    return np.maximum(x, 0) if rng.random() < 0.5 else x


def splits(rng: np.random.Generator, n: int, parts: int) -> list[tuple[int, int]]:
    cuts = np.sort(rng.integers(0, n + 1, parts - 1))
    bounds = [0, *cuts.tolist(), n]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def assert_matches(stat: TopK, x: np.ndarray, index: np.ndarray) -> None:
    want_v, want_i = brute_force(x, index, stat.k, stat.largest)
    values, indices = stat.result()
    np.testing.assert_array_equal(values.numpy(), want_v.astype(values.numpy().dtype))
    np.testing.assert_array_equal(indices.numpy(), want_i)


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 300),
    c=st.integers(1, 6),
    k=st.integers(1, 12),
    parts=st.integers(1, 5),
    largest=st.booleans(),
    ties=st.booleans(),
)
def test_any_split_merged_equals_brute_force(seed, n, c, k, parts, largest, ties):
    rng = np.random.default_rng(seed)
    x = tie_heavy(rng, n, c) if ties else rng.standard_normal((n, c)).astype(np.float32)
    one_pass = TopK(k, largest=largest)
    shards = []
    for a, b in splits(rng, n, parts):
        one_pass.update(torch.from_numpy(x[a:b]))
        shard = TopK(k, largest=largest)
        shard.update(torch.from_numpy(x[a:b]), index=a)
        shards.append(shard)
    rng.shuffle(shards)
    merged = shards[0]
    for shard in shards[1:]:
        merged.merge(shard)
    assert one_pass.count == merged.count == n
    assert_matches(one_pass, x, np.arange(n))
    assert_matches(merged, x, np.arange(n))


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 200), k=st.integers(1, 8))
def test_explicit_unsorted_indices(seed, n, k):
    rng = np.random.default_rng(seed)
    x = tie_heavy(rng, n, 3)
    ids = rng.permutation(10 * n)[:n]  # e.g. image numbers, in any order
    stat = TopK(k)
    half = n // 2
    stat.update(torch.from_numpy(x[:half]), torch.from_numpy(ids[:half]))
    stat.update(torch.from_numpy(x[half:]), torch.from_numpy(ids[half:]))
    assert_matches(stat, x, ids)


def test_nan_counts_as_the_worst_value_and_infinities_are_values():
    x = np.array([[np.nan, 1.0], [np.inf, np.nan], [2.0, -np.inf], [np.nan, np.nan]], np.float32)
    stat = TopK(3)
    stat.update(torch.from_numpy(x))
    values, indices = stat.result()
    assert values[0, :2].tolist() == [np.inf, 2.0] and indices[0, :2].tolist() == [1, 2]
    assert values[1].tolist() == [1.0, -np.inf, -np.inf] and indices[1].tolist() == [0, 1, 2]
    smallest = TopK(2, largest=False)
    smallest.update(torch.from_numpy(x))
    assert smallest.values()[1].tolist() == [-np.inf, 1.0]
    assert smallest.indices()[1].tolist() == [2, 0]
    assert smallest.values()[0].tolist() == [2.0, np.inf]  # NaN (row 0) ties with +inf


def test_fewer_rows_than_k_keeps_them_all():
    stat = TopK(5)
    stat.update(torch.tensor([[1.0], [3.0]]))
    assert stat.values().tolist() == [[3.0, 1.0]]
    assert stat.indices().tolist() == [[1, 0]]


def test_state_round_trip_is_exact_and_resumable():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(tie_heavy(rng, 100, 4))
    stat = TopK(7, largest=False)
    stat.update(x[:60])
    sd = stat.state_dict()
    restored = from_state_dict(sd)
    for key, value in sd.items():
        assert np.array_equal(np.asarray(value), np.asarray(restored.state_dict()[key]))
    stat.update(x[60:])
    restored.update(x[60:])
    assert torch.equal(stat.values(), restored.values())
    assert torch.equal(stat.indices(), restored.indices())
    empty = from_state_dict(TopK(7, largest=False).state_dict())
    assert empty.channels is None and empty.k == 7
    empty.merge(stat)
    assert torch.equal(empty.indices(), stat.indices())


def test_bad_input_and_merges_are_refused_with_both_sides_named():
    stat = TopK(2)
    with pytest.raises(ValueError, match="k >= 1, got k=0"):
        TopK(0)
    with pytest.raises(ValueError, match=r"got shape \(5,\)"):
        stat.update(torch.zeros(5))
    stat.update(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="has 3 channels, got a batch with 2"):
        stat.update(torch.zeros(5, 2))
    with pytest.raises(ValueError, match=r"5 integer indices.*shape \(4,\)"):
        stat.update(torch.zeros(5, 3), torch.arange(4))
    with pytest.raises(ValueError, match="k=3 into TopK with k=2"):
        stat.merge(TopK(3))
    other = TopK(2)
    other.update(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="channels=4 into TopK with channels=3"):
        stat.merge(other)
    with pytest.raises(ValueError, match="largest=False into TopK with largest=True"):
        stat.merge(TopK(2, largest=False))


def test_xarray_view():
    stat = TopK(2)
    stat.update(torch.tensor([[1.0, 5.0], [2.0, 4.0], [0.0, 6.0]]))
    ds = stat.to_xarray(units=["a", "b"])
    assert ds["value"].dims == ("unit", "rank")
    assert ds["index"].sel(unit="b").values.tolist() == [2, 0]
    assert ds["value"].sel(unit="a").values.tolist() == [2.0, 1.0]
