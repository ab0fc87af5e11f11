"""Quantile readout by searching sorted levels: equal to sorting everything, exactly.

The sketch answers ``quantiles`` and ``cdf`` by bisection in its row-sorted level
pieces and small merged windows (``_select_in_levels``), falling back to one sort of
the whole rows when it cannot certify an answer. These tests hold every answer to a
brute-force reference (each item repeated by its weight, then sorted) and to the
sorting path, on random levels with ties, infinities and NaN, and on whole sketches.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nethook.stats.quantile as quantile_module
from nethook.stats.base import from_state_dict
from nethook.stats.quantile import Quantile, _count_at_most, _Levels, _reduce_columns

SMALL = {"k": 64, "tail_k": 32, "k_min": 8, "tail": 0.05}
QS = np.array([0.0, 0.001, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 1.0])
FAST = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def stacks(draw) -> tuple[_Levels, np.ndarray]:
    """A stack of row-sorted pieces (ties, +-inf, some NaN rows) and per-row NaN flags."""
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    rows = draw(st.integers(1, 6))
    kind = draw(st.sampled_from(["normal", "ties", "inf", "drift", "nan"]))
    levels = _Levels(64, 8, 0, 0)
    for h in range(draw(st.integers(1, 7))):
        pieces = []
        for _ in range(draw(st.integers(0, 3))):
            n = draw(st.integers(0, 300))
            if kind == "ties":
                piece = rng.integers(0, 5, (rows, n)).astype(np.float32)
            elif kind == "drift":  # each level its own value range, like a drifting stream
                piece = (rng.standard_normal((rows, n)) + 3 * h).astype(np.float32)
            else:
                piece = rng.standard_normal((rows, n)).astype(np.float32)
            if kind in ("inf", "nan") and n:
                piece[rng.random((rows, n)) < 0.1] = -np.inf
                piece[rng.random((rows, n)) < 0.1] = np.inf
            if kind == "nan" and n:
                piece[0, rng.random(n) < 0.3] = np.nan
            pieces.append(np.sort(piece, axis=1))
        levels.pieces.append(pieces or [np.zeros((rows, 0), np.float32)])
        levels.compactions.append(0)
    has_nan = np.zeros(rows, bool)
    has_nan[0] = kind == "nan"
    return levels, has_nan


def expanded(levels: _Levels) -> np.ndarray:
    """``[C, weight]``: every item repeated by its weight, sorted (NaN last)."""
    values = [np.repeat(p, 1 << h, axis=1) for h, p in levels.sorted_pieces()]
    return np.sort(np.concatenate(values, axis=1), axis=1)


def reference_select(levels: _Levels, r: np.ndarray) -> np.ndarray:
    """The ``ceil(r)``-th smallest expanded item (clipped to ``[1, weight]``)."""
    full = expanded(levels)
    need = np.clip(np.ceil(np.clip(r, 0, None)), 1, full.shape[1]).astype(np.int64)
    return np.take_along_axis(full, need - 1, 1)


@FAST
@given(stack=stacks(), qs=st.lists(st.floats(-0.1, 1.1), min_size=1, max_size=12))
def test_select_equals_brute_force(stack, qs):
    levels, has_nan = stack
    total = levels.weight()
    if total == 0:
        return
    r = np.asarray(qs)[None, :] * total + np.zeros((has_nan.size, 1))
    expected = reference_select(levels, r)
    got = levels.select(r, has_nan)
    np.testing.assert_array_equal(got, expected)
    # The search alone, where it certifies, agrees too (rows without NaN only).
    clean = [(h, p[~has_nan]) for h, p in levels.sorted_pieces()]
    need = np.clip(np.ceil(np.clip(r[~has_nan], 0, None)), 1, total).astype(np.int64)
    if clean and need.size:
        answers, ok = quantile_module._select_in_levels(clean, need, total)
        np.testing.assert_array_equal(answers[ok], expected[~has_nan][ok])


@FAST
@given(stack=stacks(), data=st.data())
def test_counts_equal_brute_force(stack, data):
    levels, _ = stack
    rows = levels.pieces[0][0].shape[0]
    probes = np.array(
        data.draw(
            st.lists(
                st.sampled_from([-np.inf, -1.0, 0.0, 0.5, 1.0, 2.0, 7.5, np.inf, np.nan]),
                min_size=1,
                max_size=5,
            )
        ),
        np.float32,
    )
    v = np.broadcast_to(probes, (rows, probes.size)).copy()
    at_most = np.zeros(v.shape, np.int64)
    with np.errstate(invalid="ignore"):
        for h, p in levels.sorted_pieces():
            at_most += (p[:, :, None] <= v[:, None, :]).sum(1) << h
    np.testing.assert_array_equal(levels.weight_at_most(v), at_most)
    for _, p in levels.sorted_pieces():
        np.testing.assert_array_equal(_count_at_most(p, v), (p[:, :, None] <= v[:, None]).sum(1))


def make_stream(seed: int, n: int, channels: int, kind: str) -> np.ndarray:
    """``[n, C]`` data: ties, ReLU zeros, a drifting (sorted) stream, heavy tails, NaN."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, channels))
    if kind == "relu":
        x = np.maximum(x - np.linspace(0.0, 1.3, channels), 0.0)
    elif kind == "ints":
        x = rng.integers(0, 4, (n, channels)).astype(np.float64)
    elif kind == "drift":
        x = np.sort(x, axis=0)
    elif kind == "lognormal":
        x = np.exp(2 * x)
    elif kind == "nan":
        x[rng.random((n, channels)) < 0.1] = np.nan
        x[rng.random((n, channels)) < 0.05] = np.inf
    return x.astype(np.float32)


def sorting_only(monkeypatch) -> None:
    """Make every readout take the sorting path (what the sketch did before searching)."""

    def certify_nothing(levels, need, total):
        return np.zeros(need.shape, levels[0][1].dtype), np.zeros(need.shape, bool)

    monkeypatch.setattr(quantile_module, "_select_in_levels", certify_nothing)


@FAST
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(1, 20000),
    channels=st.integers(1, 5),
    kind=st.sampled_from(["normal", "relu", "ints", "drift", "lognormal", "nan"]),
    batch=st.integers(100, 5000),
)
def test_quantiles_equal_the_sorting_path(seed, n, channels, kind, batch):
    x = torch.from_numpy(make_stream(seed, n, channels, kind))
    sketch = Quantile(**SMALL, seed=seed % 5)
    for i in range(0, n, batch):
        sketch.update(x[i : i + batch])
    searched = sketch.quantiles(QS).numpy()
    with pytest.MonkeyPatch.context() as patch:
        sorting_only(patch)
        sorted_answers = from_state_dict(sketch.state_dict()).quantiles(QS).numpy()
    np.testing.assert_array_equal(searched, sorted_answers)


def test_default_sketch_readouts_equal_the_sorting_path(monkeypatch):
    """The default sketch: 4 levels, 100 levels and cdf of 100 values, as gandissect asks."""
    rng = np.random.default_rng(0)
    sketch = Quantile()
    for _ in range(6):
        x = np.maximum(rng.standard_normal((16384, 128)), 0).astype(np.float32)
        sketch.update(torch.from_numpy(x))
    levels = np.linspace(0.005, 0.995, 100)
    fresh = from_state_dict(sketch.state_dict())
    # The search itself answers (almost) everything: the sorting fallback stays rare.
    pieces = fresh._body.sorted_pieces()
    total = fresh._body.weight()
    need = np.ceil(levels[None, :] * fresh._valid()[:, None]).astype(np.int64)
    assert quantile_module._select_in_levels(pieces, need, total)[1].mean() > 0.99
    four = fresh.quantiles([0.5, 0.99, 0.995, 0.999]).numpy()
    hundred = fresh.quantiles(levels).numpy()
    cdf = fresh.cdf(torch.from_numpy(hundred)).numpy()
    sorting_only(monkeypatch)
    reference = from_state_dict(sketch.state_dict())
    np.testing.assert_array_equal(four, reference.quantiles([0.5, 0.99, 0.995, 0.999]).numpy())
    np.testing.assert_array_equal(hundred, reference.quantiles(levels).numpy())
    # cdf: the weight at or below each value, from the expanded items of both stacks.
    body, tail = expanded(reference._body), expanded(reference._tail)
    v = hundred.astype(body.dtype)
    count = np.stack([np.searchsorted(body[c], v[c], "right") for c in range(128)])
    in_tail = np.stack([np.searchsorted(tail[c], v[c], "right") for c in range(128)])
    in_tail = in_tail + reference.count - tail.shape[1]
    count = np.where(v > reference._threshold[:, None], in_tail, count).astype(np.float64)
    count = np.where(v >= reference._max[:, None], reference.count, count)
    np.testing.assert_array_equal(cdf, count / reference.count)


def test_readouts_between_updates_change_nothing():
    """Lazy sorting, pieces and caches never alter the state: same stream, same sketch."""
    x = torch.from_numpy(make_stream(3, 30000, 3, "lognormal"))
    read, unread = Quantile(**SMALL), Quantile(**SMALL)
    for i in range(0, 30000, 1700):
        read.update(x[i : i + 1700])
        unread.update(x[i : i + 1700])
        read.quantiles([0.5, 0.995])
        read.cdf(1.0)
        read.state_dict()
    a, b = read.state_dict(), unread.state_dict()
    for key in ("body", "tail_levels"):
        for field in ("items", "sizes", "compactions"):
            np.testing.assert_array_equal(a[key][field], b[key][field])
    np.testing.assert_array_equal(read.quantiles(QS).numpy(), unread.quantiles(QS).numpy())


def test_levels_are_saved_sorted_and_version_1_states_load():
    x = torch.from_numpy(make_stream(5, 20000, 3, "normal"))
    sketch = Quantile(**SMALL)
    sketch.update(x)
    sd = sketch.state_dict()
    assert sd["version"] == 2
    bounds = np.concatenate([[0], np.cumsum(sd["body"]["sizes"])])
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        level = sd["body"]["items"][:, lo:hi]
        np.testing.assert_array_equal(level, np.sort(level, axis=1))
    # A version-1 state kept levels in arrival order: shuffled levels load equal.
    old = {**sd, "version": 1, "body": dict(sd["body"])}
    items = old["body"]["items"].copy()
    rng = np.random.default_rng(0)
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        items[:, lo:hi] = rng.permuted(items[:, lo:hi], axis=1)
    old["body"]["items"] = items
    np.testing.assert_array_equal(
        from_state_dict(old).quantiles(QS).numpy(), sketch.quantiles(QS).numpy()
    )


def test_torch_path_reads_the_same_answers(monkeypatch):
    """The accelerator path (one torch sort per stack) equals the numpy search."""
    x = torch.from_numpy(make_stream(7, 20000, 4, "relu"))
    sketch = Quantile(**SMALL)
    sketch.update(x)
    grid = torch.linspace(-0.5, 3.0, 9).repeat(4, 1)
    expected = sketch.quantiles(QS).numpy(), sketch.cdf(grid).numpy()
    monkeypatch.setattr(quantile_module, "NUMPY_ON_CPU", False)
    on_torch = from_state_dict(sketch.state_dict())
    assert isinstance(on_torch._body.level(0), torch.Tensor)
    np.testing.assert_array_equal(on_torch.quantiles(QS).numpy(), expected[0])
    np.testing.assert_array_equal(on_torch.cdf(grid).numpy(), expected[1])


@FAST
@given(
    n=st.integers(1, 3000),
    channels=st.integers(1, 300),
    seed=st.integers(0, 2**31),
    nan=st.booleans(),
)
def test_column_reductions_equal_numpy(n, channels, seed, nan):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, channels)).astype(np.float32)
    if nan:
        a[rng.random(a.shape) < 0.05] = np.nan
    for ufunc in (np.minimum, np.maximum, np.fmin, np.fmax):
        np.testing.assert_array_equal(_reduce_columns(ufunc, a), ufunc.reduce(a, axis=0))
    np.testing.assert_array_equal(_reduce_columns(np.add, a > 0, np.int64), (a > 0).sum(0))
