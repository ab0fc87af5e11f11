"""Histogram and Bincount against numpy, for any split of the data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nethook.stats import from_state_dict
from nethook.stats.base import states_equal
from nethook.stats.histogram import Bincount, Histogram

SETTINGS = settings(max_examples=30, deadline=None)


def messy(rng: np.random.Generator, n: int, c: int) -> np.ndarray:
    """Channels of very different scales, with ties, zeros, infinities and NaN."""
    scale = 10.0 ** rng.integers(-4, 5, c)
    x = rng.standard_normal((n, c)) * scale + rng.integers(-3, 4, c) * scale
    x[rng.random((n, c)) < 0.2] = 0.0
    special = rng.random((n, c))
    x[special < 0.02] = np.nan
    x[(special >= 0.02) & (special < 0.03)] = np.inf
    x[(special >= 0.03) & (special < 0.04)] = -np.inf
    return x.astype(np.float32)


def splits(rng: np.random.Generator, n: int, parts: int) -> list[slice]:
    cuts = np.sort(rng.integers(0, n + 1, parts - 1))
    bounds = [0, *cuts.tolist(), n]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 400),
    c=st.integers(1, 5),
    bins=st.integers(2, 40),
    parts=st.integers(1, 5),
)
def test_data_derived_bins_count_exactly_and_merge_equals_one_pass(seed, n, c, bins, parts):
    rng = np.random.default_rng(seed)
    x = messy(rng, n, c)
    one = Histogram(bins=bins)
    shards = []
    for s in splits(rng, n, parts):
        one.update(torch.from_numpy(x[s]))
        shards.append(Histogram(bins=bins))
        shards[-1].update(torch.from_numpy(x[s]))
    rng.shuffle(shards)
    merged = shards[0]
    for shard in shards[1:]:
        merged.merge(shard)
    assert states_equal(merged.state_dict(), one.state_dict())

    edges, counts = one.edges().numpy(), one.counts().numpy()
    for ch in range(c):
        col = x[:, ch].astype(np.float64)
        finite = col[np.isfinite(col)]
        assert one.nan_count()[ch] == np.isnan(col).sum()
        assert one.underflow()[ch] == np.isneginf(col).sum()
        assert one.overflow()[ch] == np.isposinf(col).sum()
        if finite.size == 0:
            assert counts[ch].sum() == 0 and np.isnan(edges[ch]).all()
            continue
        assert finite.max() < edges[ch, -1]  # every bin half-open, the data inside
        np.testing.assert_array_equal(counts[ch], np.histogram(finite, bins=edges[ch])[0])
        width = edges[ch, 1] - edges[ch, 0]
        assert np.log2(width) == int(np.log2(width))  # power-of-two width
        if width > one.min_width * 2:  # the width is the smallest that fits the range
            half = width / 2
            assert np.floor(finite.max() / half) - np.floor(finite.min() / half) >= bins


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 300),
    c=st.integers(1, 4),
    bins=st.integers(1, 20),
    per_channel=st.booleans(),
)
def test_fixed_edges_match_numpy(seed, n, c, bins, per_channel):
    rng = np.random.default_rng(seed)
    x = messy(rng, n, c)
    if per_channel:
        # sorted, plus a strictly increasing ramp: strictly increasing per channel
        edges = np.sort(rng.standard_normal((c, bins + 1)) * 100, axis=1) + np.arange(bins + 1)
        stat = Histogram(edges=edges)
    else:
        edges = np.linspace(-50, 50, bins + 1)
        stat = Histogram(bins=bins, range=(-50, 50))
    x[0, :] = edges[..., -1]  # the last edge belongs to the last bin
    for s in splits(rng, n, 3):
        stat.update(torch.from_numpy(x[s]))
    grid = np.broadcast_to(edges, (c, bins + 1))
    for ch in range(c):
        col = x[:, ch].astype(np.float64)
        values = col[~np.isnan(col)]
        np.testing.assert_array_equal(
            stat.counts()[ch].numpy(), np.histogram(values, bins=grid[ch])[0]
        )
        assert stat.underflow()[ch] == (values < grid[ch, 0]).sum()
        assert stat.overflow()[ch] == (values > grid[ch, -1]).sum()
        assert stat.nan_count()[ch] == np.isnan(col).sum()
    np.testing.assert_array_equal(stat.edges().numpy(), grid)


def test_round_trips_and_resumes():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(messy(rng, 200, 3))
    for stat in (
        Histogram(bins=16),
        Histogram(bins=4, range=(-1.0, 1.0)),
        Histogram(edges=[[0, 1], [2, 3], [4, 5]]),
    ):
        stat.update(x[:120])
        restored = from_state_dict(stat.state_dict())
        assert states_equal(restored.state_dict(), stat.state_dict())
        stat.update(x[120:])
        restored.update(x[120:])
        assert states_equal(restored.state_dict(), stat.state_dict())
        fresh = from_state_dict(type(stat)(bins=16).state_dict())
        assert fresh.channels is None and fresh.count == 0


def test_xarray_view():
    stat = Histogram(bins=4, range=(0.0, 4.0))
    stat.update(torch.tensor([[0.5, 1.5], [3.5, 9.0]]))
    ds = stat.to_xarray(units=["a", "b"])
    assert ds["counts"].dims == ("unit", "bin") and ds["edges"].dims == ("unit", "edge")
    assert ds["counts"].sel(unit="a").values.tolist() == [1, 0, 0, 1]
    assert ds["overflow"].sel(unit="b").item() == 1


def test_histogram_refusals_name_both_sides():
    with pytest.raises(ValueError, match="strictly increasing"):
        Histogram(edges=[0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match=r"lo < hi, got \(1, 0\)"):
        Histogram(bins=3, range=(1, 0))
    with pytest.raises(ValueError, match="bins >= 1, got 0"):
        Histogram(bins=0)
    stat = Histogram(edges=[[0, 1], [0, 2]])
    with pytest.raises(ValueError, match="has 2 channels, got a batch with 3"):
        stat.update(torch.zeros(4, 3))
    with pytest.raises(
        ValueError, match=r"edges \(2,\) from 0 to 3 into Histogram with edges \(2, 2\)"
    ):
        stat.merge(Histogram(edges=[0, 3]))
    with pytest.raises(ValueError, match="mode='adaptive' into Histogram with mode='fixed'"):
        stat.merge(Histogram(bins=2))
    with pytest.raises(ValueError, match="data-derived bins needs bins >= 2"):
        Histogram(bins=1)
    with pytest.raises(ValueError, match="bins=8 into Histogram with bins=4"):
        Histogram(bins=4).merge(Histogram(bins=8))
    with pytest.raises(TypeError, match="cannot merge Bincount into Histogram"):
        Histogram().merge(Bincount())


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(0, 300),
    c=st.integers(1, 4),
    parts=st.integers(1, 4),
)
def test_bincount_matches_numpy_and_merges(seed, n, c, parts):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, rng.integers(1, 30), (n, c))
    one = Bincount(minlength=3)
    merged = Bincount(minlength=3)
    for s in splits(rng, n, parts):
        one.update(torch.from_numpy(x[s]))
        shard = Bincount(minlength=3)
        shard.update(torch.from_numpy(x[s]))
        merged.merge(shard)
    length = max(3, int(x.max()) + 1 if n else 3)
    want = np.stack([np.bincount(x[:, ch], minlength=length) for ch in range(c)])
    np.testing.assert_array_equal(one.counts().numpy(), want)
    np.testing.assert_array_equal(merged.counts().numpy(), want)
    assert states_equal(from_state_dict(one.state_dict()).state_dict(), one.state_dict())
    assert one.to_xarray()["counts"].dims == ("unit", "value")


def test_bincount_refusals():
    stat = Bincount()
    with pytest.raises(ValueError, match="integer values, got torch.float32"):
        stat.update(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="non-negative integers, got minimum -2"):
        stat.update(torch.tensor([[1, -2]]))
    stat.update(torch.tensor([[True, False]]))
    other = Bincount()
    other.update(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="channels=3 into Bincount with channels=2"):
        stat.merge(other)
