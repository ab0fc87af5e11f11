"""TopQuantile against exact ranks: bound, order, ties, merge, state, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nethook.stats.quantile as quantile_module
from nethook.stats.base import from_state_dict
from nethook.stats.top_quantile import TopQuantile

FAST = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SMALL = {"k": 64, "k_min": 8}  # compacts after a few hundred kept values a channel


def maps(seed: int, n: int, channels: int, kind: str, positions: int = 16) -> np.ndarray:
    """``[n, C, positions]`` float32 data with known ties and tails."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, channels, positions))
    if kind == "relu":  # mostly exact zeros, more so in later channels
        x = np.maximum(x - np.linspace(0.0, 3.5, channels)[None, :, None], 0.0)
    elif kind == "ints":  # ties everywhere
        x = rng.integers(0, 5, x.shape).astype(np.float64)
    elif kind == "lognormal":
        x = np.exp(2 * x)
    return x.astype(np.float32)


def exact(x: np.ndarray, q: float) -> np.ndarray:
    """Per channel, the inverted-CDF quantile of every value of ``[n, C, P]``."""
    rows = x.transpose(1, 0, 2).reshape(x.shape[1], -1)
    return np.quantile(rows.astype(np.float64), q, axis=1, method="inverted_cdf")


def rank_gap(x: np.ndarray, answer: np.ndarray, q: float) -> np.ndarray:
    """Per channel: how far the answer's rank interval lies from ``q`` (0 if it holds q)."""
    rows = x.transpose(1, 0, 2).reshape(x.shape[1], -1).astype(np.float64)
    below = (rows < answer[:, None]).mean(1)
    at_most = (rows <= answer[:, None]).mean(1)
    return np.maximum(0.0, np.maximum(below - q, q - at_most))


def feed(stat: TopQuantile, x: np.ndarray, cuts: list[int]) -> None:
    for a, b in zip([0, *cuts], [*cuts, len(x)], strict=True):
        stat.update(torch.from_numpy(x[a:b]))


@FAST
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 300),
    kind=st.sampled_from(["normal", "relu", "ints", "lognormal"]),
    share=st.sampled_from([0.005, 0.02, 0.1]),
    known=st.booleans(),
    warmup=st.sampled_from([None, 0, 200, 2000]),
    data=st.data(),
)
def test_answers_within_the_stated_bound(seed, n, kind, share, known, warmup, data) -> None:
    """Any split of any data, any warmup: ``1 - share`` and the maximum are within the bound."""
    x = maps(seed, n, 6, kind)
    cuts = sorted(data.draw(st.lists(st.integers(1, max(1, n - 1)), max_size=4, unique=True)))
    cuts = [c for c in cuts if c < n]
    total = x.shape[0] * x.shape[2] if known else None
    stat = TopQuantile(share=share, total=total, warmup=warmup, **SMALL)
    feed(stat, x, cuts)
    q = 1.0 - share
    got = stat.quantiles([q, 1.0]).numpy()
    bound = stat.rank_error_bound().numpy()
    assert stat.count == x.shape[0] * x.shape[2]
    np.testing.assert_array_equal(got[:, 1], x.max((0, 2)))
    np.testing.assert_array_equal(stat.min().numpy(), x.min((0, 2)))
    sure = ~stat.uncertain([q]).numpy()[:, 0]
    assert sure.all() or not known  # guaranteed with the total; likely without
    assert (rank_gap(x, got[:, 0], q)[sure] <= bound[sure] + 1e-12).all()
    if stat._levels.variance() == 0:  # nothing compacted: exact
        np.testing.assert_array_equal(got[sure, 0], exact(x, q).astype(np.float32)[sure])


@pytest.mark.parametrize("order", ["ascending", "descending"])
def test_any_order_is_safe_with_the_total(order: str) -> None:
    """Values sorted over time (the floor's worst case) still give certified answers."""
    rng = np.random.default_rng(0)
    values = np.sort(rng.standard_normal(40_000).astype(np.float32))
    if order == "descending":
        values = values[::-1].copy()
    x = np.stack([values, 2 * values], 1).reshape(-1, 2, 1)  # [N, C=2, P=1]
    stat = TopQuantile(share=0.005, total=len(values))
    feed(stat, x, list(range(1000, len(values), 1000)))
    got = stat.quantiles([0.995]).numpy()[:, 0]
    assert not stat.uncertain([0.995]).any()
    assert (rank_gap(x, got, 0.995) <= stat.rank_error_bound().numpy() + 1e-12).all()


def test_keeps_a_small_share_of_the_values() -> None:
    """Once the floor is up, only about ``margin * share`` of a batch is sketched."""
    stat = TopQuantile(share=0.005, total=200 * 4096, margin=1.25)
    rng = np.random.default_rng(1)
    kept = []
    for _ in range(200 // 20):
        x = rng.standard_normal((20, 3, 4096)).astype(np.float32)
        stat.update(x)
        kept.append(len(stat.above) / x.size)
    assert kept[0] < 0.1 and kept[-1] < 0.02  # the tracked top share is 0.625%


def test_above_lists_the_values_sent_to_the_sketch() -> None:
    stat = TopQuantile(share=0.01, total=10 * 3 * 500)
    rng = np.random.default_rng(2)
    for _ in range(10):
        x = rng.standard_normal((3, 4, 500)).astype(np.float32)
        floor = stat.floor.numpy() if stat.channels else np.full(4, -np.inf, np.float32)
        stat.update(x)
        if stat.count > 3 * 500:  # once the first floor is set, before this batch
            np.testing.assert_array_equal(stat.above, np.flatnonzero(x > floor[None, :, None]))


def test_warmup_holds_the_first_values_then_sets_a_tighter_floor() -> None:
    """Held values: no ``above``, floor -inf; once placed, the floor (set from all of
    them) is below the ``R``-th largest, and tighter than the first batch alone gives."""
    x = maps(7, 400, 3, "normal", positions=64)
    held = TopQuantile(share=0.01, total=400 * 64, margin=1.25, warmup=100 * 64)
    plain = TopQuantile(share=0.01, total=400 * 64, margin=1.25)
    for stat in (held, plain):
        stat.update(x[:25])
    assert held.holding and held.above is None and np.isneginf(held.floor.numpy()).all()
    first = plain.floor.numpy()  # set from the first 25 images alone
    for stat in (held, plain):
        for a in range(25, 100, 25):
            stat.update(x[a : a + 25])
    assert not held.holding and held.above is None  # placed at the update that filled it
    keep = int(np.ceil(1.25 * 0.01 * 400 * 64))
    rows = x[:100].transpose(1, 0, 2).reshape(3, -1)
    rth = -np.sort(-rows, axis=1)[:, keep - 1]
    assert (held.floor.numpy() < rth).all()
    assert (held.floor.numpy() > first).all()
    for stat in (held, plain):
        stat.update(x[100:])
    assert not held.uncertain([0.99]).any()
    assert (rank_gap(x, held.quantiles([0.99]).numpy()[:, 0], 0.99) <= 1e-3).all()


def test_first_floor_is_checked_against_every_value() -> None:
    """Data that fools the every-7th-value candidate (the sampled positions are the
    large ones) still gets a floor with ``R`` values above it."""
    x = np.zeros((20, 2, 700), np.float32)
    x[:, :, ::7] = 10.0 + np.arange(100, dtype=np.float32)[None, None, :]
    x[:, :, 1::7] = 1.0
    stat = TopQuantile(share=0.02, total=20 * 700, margin=1.25, warmup=20 * 700)
    stat.update(x)
    floor = stat.floor.numpy()
    keep = int(np.ceil(1.25 * 0.02 * 20 * 700))
    above = (x.transpose(1, 0, 2).reshape(2, -1) > floor[:, None]).sum(1)
    assert (above >= keep).all()
    assert np.array_equal(stat.quantiles([0.98]).numpy()[:, 0], exact(x, 0.98).astype(np.float32))


def test_ties_at_the_minimum_and_at_the_top() -> None:
    """A silent ReLU unit answers its minimum, exactly; a binary one its top value."""
    x = np.zeros((400, 2, 25), np.float32)
    x[:10, 0, 0] = 1.0  # unit 0: 10 of 10,000 values are on (0.1% < 0.5%)
    x[:, 1, :] = 0.2
    x[:80, 1, :] = 1.0  # unit 1: 20% are on: the top 0.5% is tied at 1
    stat = TopQuantile(share=0.005, total=400 * 25, **SMALL)
    feed(stat, x, list(range(40, 400, 40)))
    got = stat.quantiles([0.995]).numpy()[:, 0]
    np.testing.assert_array_equal(got, exact(x, 0.995).astype(np.float32))
    assert not stat.uncertain([0.995]).any()
    assert got[0] == stat.min().numpy()[0] == 0.0 and got[1] == 1.0


def test_merged_shards_agree_with_one_pass() -> None:
    x = maps(3, 600, 5, "lognormal")
    whole = TopQuantile(share=0.01, total=600 * 16, **SMALL)
    feed(whole, x, list(range(50, 600, 50)))
    shards = [TopQuantile(share=0.01, total=600 * 16, **SMALL) for _ in range(3)]
    for i, shard in enumerate(shards):
        feed(shard, x[i * 200 : (i + 1) * 200], [100])
    merged = shards[0]
    merged.merge(shards[1])
    merged.merge(shards[2])
    assert merged.count == whole.count
    got = merged.quantiles([0.99]).numpy()[:, 0]
    assert not merged.uncertain([0.99]).any()
    assert (rank_gap(x, got, 0.99) <= merged.rank_error_bound().numpy() + 1e-12).all()
    with pytest.raises(ValueError, match="share"):
        merged.merge(TopQuantile(share=0.02, total=600 * 16, **SMALL))


@pytest.mark.parametrize("warmup", [None, 200 * 16])
def test_state_round_trip_continues_identically(warmup) -> None:
    """Also while the warmup holds values (they are part of the state)."""
    x = maps(4, 300, 3, "relu")
    a = TopQuantile(share=0.02, total=300 * 16, warmup=warmup, **SMALL)
    feed(a, x[:150], [50, 100])
    b = from_state_dict(a.state_dict())
    assert isinstance(b, TopQuantile) and b.holding == (warmup is not None)
    for stat in (a, b):
        feed(stat, x[150:], [200])
    np.testing.assert_array_equal(a.quantiles([0.98, 0.99]), b.quantiles([0.98, 0.99]))
    np.testing.assert_array_equal(a.floor, b.floor)


@pytest.mark.parametrize("warmup", [None, 100 * 16])
def test_torch_kernels_equal_numpy(monkeypatch, warmup) -> None:
    """The accelerator path (torch tensors), run on CPU, gives the same answers."""
    x = maps(5, 200, 4, "normal")
    fast = TopQuantile(share=0.02, total=200 * 16, warmup=warmup, **SMALL)
    feed(fast, x, [70, 140])
    monkeypatch.setattr(quantile_module, "NUMPY_ON_CPU", False)
    slow = TopQuantile(share=0.02, total=200 * 16, warmup=warmup, **SMALL)
    feed(slow, x, [70, 140])
    assert not isinstance(slow._floor, np.ndarray)
    np.testing.assert_array_equal(fast.floor, slow.floor)
    np.testing.assert_array_equal(fast.quantiles([0.98]), slow.quantiles([0.98]))


def test_results_with_named_dims() -> None:
    stat = TopQuantile(share=0.1)
    stat.update(maps(6, 20, 3, "normal"))
    ds = stat.to_xarray(units=["a", "b", "c"])
    assert ds["quantiles"].dims == ("unit", "quantile")
    assert list(ds["unit"].values) == ["a", "b", "c"]
    assert float(ds["quantile"][0]) == pytest.approx(0.9)


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="share must be"):
        TopQuantile(share=0.7)
    with pytest.raises(ValueError, match="total must be"):
        TopQuantile(total=0)
    with pytest.raises(ValueError, match="warmup must be"):
        TopQuantile(warmup=-1)
    stat = TopQuantile(share=0.01)
    with pytest.raises(ValueError, match="seen no data"):
        stat.quantiles([0.995])
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        stat.update(torch.zeros(5))
    stat.update(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="has 3 channels, got 2"):
        stat.update(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="answers quantiles >= 0.99"):
        stat.quantiles([0.5])
    with pytest.raises(ValueError, match="NaN values in channels \\[1\\]"):
        stat.update(torch.tensor([[0.0, float("nan"), 1.0]]))
