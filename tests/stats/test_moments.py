"""Mean, Variance, Covariance, CrossCovariance, SecondMoment against numpy float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from nethook.stats import from_state_dict
from nethook.stats.moments import Covariance, CrossCovariance, Mean, SecondMoment, Variance

SETTINGS = settings(max_examples=20, deadline=None)


def drifting(rng: np.random.Generator, n: int, c: int, offset: float) -> np.ndarray:
    """Correlated float32 data whose mean drifts by several std across the rows."""
    mix = rng.standard_normal((c, c)) / np.sqrt(c)
    x = rng.standard_normal((n, c)) @ mix * rng.uniform(0.1, 3, c)
    drift = np.linspace(0, 1, n)[:, None] * rng.standard_normal(c) * 3
    return (x + drift + offset).astype(np.float32)


def random_splits(rng: np.random.Generator, n: int, parts: int) -> list[slice]:
    """Contiguous slices covering ``range(n)``, empty ones allowed."""
    cuts = np.sort(rng.integers(0, n + 1, parts - 1))
    bounds = [0, *cuts.tolist(), n]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def stream(stat, x: np.ndarray, splits: list[slice]):
    """Feed the rows of ``x`` to ``stat`` in the given batches."""
    for s in splits:
        stat.update(torch.from_numpy(x[s]))
    return stat


def rel_err(a, ref) -> float:
    """Frobenius-norm relative error."""
    a = a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(50, 3000),
    c=st.one_of(st.integers(1, 8), st.integers(30, 70)),
    parts=st.integers(1, 6),
    offset=st.sampled_from([0.0, 1e3, 1e4, -1e4]),
)
def test_covariance_float32_path_within_1e_6(seed, n, c, parts, offset):
    rng = np.random.default_rng(seed)
    x = drifting(rng, n, c, offset)
    stat = stream(Covariance(), x, random_splits(rng, n, parts))
    ref = x.astype(np.float64)
    assert stat.count == n
    assert rel_err(stat.covariance(), np.atleast_2d(np.cov(ref, rowvar=False))) <= 1e-6
    assert np.all(np.abs(stat.mean().numpy() - ref.mean(0)) <= 1e-6 * ref.std(0))


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(50, 3000),
    c=st.integers(1, 24),
    parts=st.integers(1, 6),
    offset=st.sampled_from([0.0, 1e4]),
    as64=st.booleans(),
)
def test_covariance_float64_option_within_1e_12(seed, n, c, parts, offset, as64):
    rng = np.random.default_rng(seed)
    x = drifting(rng, n, c, offset)
    if as64:
        x = x.astype(np.float64) + rng.standard_normal(x.shape) * 1e-3
    stat = stream(Covariance(dtype=torch.float64), x, random_splits(rng, n, parts))
    ref = x.astype(np.float64)
    assert rel_err(stat.covariance(), np.atleast_2d(np.cov(ref, rowvar=False))) <= 1e-12
    # the mean's error relative to the data's magnitude (a mean near 0 has no relative scale)
    assert np.all(np.abs(stat.mean().numpy() - ref.mean(0)) <= 1e-14 * np.abs(ref).max(0))


def test_naive_float32_fails_where_covariance_holds():
    """The test data really are hard: the textbook float32 formula breaks on them."""
    rng = np.random.default_rng(0)
    x = drifting(rng, 4000, 16, 1e4)
    ref = np.cov(x.astype(np.float64), rowvar=False)
    t = torch.from_numpy(x)
    naive = (t.T @ t / len(t) - torch.outer(t.mean(0), t.mean(0))) * len(t) / (len(t) - 1)
    assert rel_err(naive.double(), ref) > 1e-2
    assert rel_err(stream(Covariance(), x, [slice(0, 4000)]).covariance(), ref) <= 1e-6


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(2, 1500),
    c=st.integers(1, 12),
    parts=st.integers(1, 5),
    offset=st.sampled_from([0.0, 1e4]),
)
def test_mean_variance_second_moment(seed, n, c, parts, offset):
    rng = np.random.default_rng(seed)
    x = drifting(rng, n, c, offset)
    ref = x.astype(np.float64)
    splits = random_splits(rng, n, parts)
    mean = stream(Mean(), x, splits)
    var = stream(Variance(), x, splits)
    sm = stream(SecondMoment(dtype=torch.float64), x, splits)
    assert np.all(np.abs(mean.mean().numpy() - ref.mean(0)) <= 1e-6 * ref.std(0))
    assert rel_err(var.variance(), ref.var(0, ddof=1)) <= 1e-6
    assert rel_err(var.variance(unbiased=False), ref.var(0)) <= 1e-6
    assert rel_err(var.std(), ref.std(0, ddof=1)) <= 1e-6
    assert rel_err(sm.moment(), ref.T @ ref / n) <= 1e-12


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(3, 1500),
    cx=st.integers(1, 10),
    cy=st.integers(1, 10),
    parts=st.integers(1, 5),
    offset=st.sampled_from([0.0, 1e4]),
)
def test_cross_covariance(seed, n, cx, cy, parts, offset):
    rng = np.random.default_rng(seed)
    xy = drifting(rng, n, cx + cy, offset)
    x, y = xy[:, :cx], xy[:, cx:]
    stat = CrossCovariance()
    for s in random_splits(rng, n, parts):
        stat.update(torch.from_numpy(x[s]), torch.from_numpy(y[s]))
    ref = np.cov(xy.astype(np.float64), rowvar=False)
    assert stat.count == n
    assert rel_err(stat.covariance(), ref[:cx, cx:]) <= 1e-6
    corr = np.corrcoef(xy.astype(np.float64), rowvar=False)[:cx, cx:]
    assert np.abs(stat.correlation().numpy() - corr).max() <= 1e-6
    mx, my = stat.mean()
    ref_x = xy[:, :cx].astype(np.float64)
    assert np.all(np.abs(mx.numpy() - ref_x.mean(0)) <= 1e-6 * ref_x.std(0))
    ref64 = xy.astype(np.float64)
    # E[x y] may cancel to near 0; float32 data err relative to sqrt(E[x^2] E[y^2])
    scale = np.sqrt((ref64[:, :cx] ** 2).mean(0))[:, None] * np.sqrt((ref64[:, cx:] ** 2).mean(0))
    moment_err = stat.moment().numpy() - ref64[:, :cx].T @ ref64[:, cx:] / n
    assert np.linalg.norm(moment_err) <= 1e-6 * np.linalg.norm(scale)


def test_correlation_and_moment_of_covariance():
    rng = np.random.default_rng(3)
    x = drifting(rng, 2000, 8, 100.0)
    stat = stream(Covariance(), x, [slice(0, 700), slice(700, 2000)])
    ref = x.astype(np.float64)
    assert np.abs(stat.correlation().numpy() - np.corrcoef(ref, rowvar=False)).max() <= 1e-6
    assert rel_err(stat.moment(), ref.T @ ref / len(ref)) <= 1e-6
    assert rel_err(stat.variance(), ref.var(0, ddof=1)) <= 1e-6


KINDS = [Mean, Variance, Covariance, SecondMoment]


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 800),
    c=st.integers(1, 8),
    parts=st.integers(1, 6),
    kind=st.sampled_from(KINDS),
    dtype=st.sampled_from([None, torch.float64]),
)
def test_merge_of_any_split_equals_one_pass(seed, n, c, parts, kind, dtype):
    rng = np.random.default_rng(seed)
    x = drifting(rng, n, c, 1e4)
    whole = stream(kind(dtype=dtype), x, [slice(0, n)])
    shards = [stream(kind(dtype=dtype), x, [s]) for s in random_splits(rng, n, parts)]
    while len(shards) > 1:  # merge in a random tree order
        i = int(rng.integers(0, len(shards) - 1))
        shards[i].merge(shards.pop(i + 1))
    merged = shards[0]
    tol = 1e-12 if dtype is not None else 1e-6
    assert merged.count == whole.count == n
    assert rel_err(merged.mean(), whole.mean().numpy()) <= 1e-13
    if kind is Variance and n > 1:
        assert rel_err(merged.variance(), whole.variance().numpy()) <= tol
    if kind is Variance and n == 1:  # the unbiased variance of one sample is undefined
        assert torch.isnan(merged.variance()).all() and torch.isnan(whole.variance()).all()
    if kind in (Covariance, SecondMoment) and n > 1:
        assert rel_err(merged.covariance(), whole.covariance().numpy()) <= tol


def test_cross_covariance_merge_equals_one_pass():
    rng = np.random.default_rng(5)
    xy = drifting(rng, 1000, 7, 1e4)
    x, y = torch.from_numpy(xy[:, :3]), torch.from_numpy(xy[:, 3:])
    whole = CrossCovariance()
    whole.update(x, y)
    a, b, c = CrossCovariance(), CrossCovariance(), CrossCovariance()
    a.update(x[:100], y[:100])
    b.update(x[100:650], y[100:650])
    c.update(x[650:], y[650:])
    b.merge(c)
    a.merge(b)
    assert a.count == 1000
    assert rel_err(a.covariance(), whole.covariance().numpy()) <= 1e-6
    empty = CrossCovariance()
    empty.merge(a)
    assert torch.equal(empty.covariance(), a.covariance())


@pytest.mark.parametrize("kind", [*KINDS, CrossCovariance])
def test_state_round_trip_is_exact_and_resumable(kind):
    rng = np.random.default_rng(7)
    x = torch.from_numpy(drifting(rng, 300, 6, 1e4))

    def feed(stat, rows):
        if kind is CrossCovariance:
            stat.update(rows[:, :4], rows[:, 4:])
        else:
            stat.update(rows)

    original = kind()
    feed(original, x[:200])
    restored = from_state_dict(original.state_dict())
    assert type(restored) is kind
    for key, value in original.state_dict().items():
        other = restored.state_dict()[key]
        if isinstance(value, dict):
            for k, v in value.items():
                assert np.array_equal(v, other[k])
        else:
            assert np.array_equal(value, other)
    feed(original, x[200:])
    feed(restored, x[200:])
    for a, b in zip(_readouts(original), _readouts(restored), strict=True):
        assert torch.equal(a, b)


def _readouts(stat) -> list[torch.Tensor]:
    if isinstance(stat, CrossCovariance):
        return [*stat.mean(), stat.covariance()]
    out = [stat.mean()]
    if hasattr(stat, "variance"):
        out.append(stat.variance())
    return out


def test_empty_stats_round_trip_and_merge():
    empty = from_state_dict(Covariance(dtype=torch.float64).state_dict())
    assert empty.count == 0 and empty.channels is None and empty.dtype == torch.float64
    with pytest.raises(ValueError, match="no data"):
        empty.covariance()
    full = Covariance()
    full.update(torch.randn(10, 3))
    empty.merge(full)
    assert empty.count == 10
    assert torch.equal(empty.covariance(), full.covariance())
    full.merge(Covariance())
    assert full.count == 10


def test_batch_of_wrong_rank_or_channels_names_expected_and_got():
    stat = Covariance()
    with pytest.raises(ValueError, match=r"\[N, C\].*got shape \(2, 3, 4\)"):
        stat.update(torch.zeros(2, 3, 4))
    stat.update(torch.randn(5, 3))
    with pytest.raises(ValueError, match="has 3 channels, got a batch with 4"):
        stat.update(torch.randn(5, 4))
    cross = CrossCovariance()
    with pytest.raises(ValueError, match="paired rows, got 5 x rows and 4 y rows"):
        cross.update(torch.randn(5, 2), torch.randn(4, 2))


def test_merging_different_kinds_or_channels_is_refused():
    a, b = Covariance(), Covariance()
    a.update(torch.randn(4, 3))
    b.update(torch.randn(4, 5))
    with pytest.raises(ValueError, match="channels=5.*channels=3"):
        a.merge(b)
    with pytest.raises(TypeError, match="cannot merge Mean into Covariance"):
        a.merge(Mean())
    with pytest.raises(TypeError, match="SecondMoment into Covariance"):
        a.merge(SecondMoment())


def test_newer_format_version_is_refused():
    sd = Mean().state_dict()
    sd["version"] = Mean.version + 1
    with pytest.raises(ValueError, match=f"version {Mean.version + 1}.*version {Mean.version}"):
        from_state_dict(sd)


def test_xarray_views_have_named_dims():
    stat = Covariance()
    stat.update(torch.randn(20, 3))
    ds = stat.to_xarray(units=["a", "b", "c"])
    assert isinstance(ds, xr.Dataset)
    assert ds["covariance"].dims == ("unit", "unit2")
    assert list(ds["mean"].unit.values) == ["a", "b", "c"]
    assert np.allclose(ds["covariance"].values, stat.covariance().numpy())
    cross = CrossCovariance()
    cross.update(torch.randn(20, 2), torch.randn(20, 4))
    assert cross.to_xarray()["correlation"].dims == ("unit_x", "unit_y")
    assert cross.to_xarray()["correlation"].shape == (2, 4)
    second = SecondMoment()
    second.update(torch.randn(20, 3))
    assert second.to_xarray()["moment"].dims == ("unit", "unit2")
    var = Variance()
    var.update(torch.randn(20, 3))
    assert var.to_xarray()["variance"].dims == ("unit",)
    with pytest.raises(ValueError, match="expected 3 unit labels"):
        var.to_xarray(units=["a"])


def test_stat_follows_its_data_device():
    stat = Mean()
    stat.update(torch.randn(4, 2))
    assert stat.device == torch.device("cpu")
    stat.update(torch.randn(4, 2, device="meta"))  # a stat follows its data
    assert stat.device.type == "meta" and stat.mean().device.type == "meta"
    cov = Covariance()
    cov.update(torch.randn(4, 2, device="meta"))  # one batch: no data-dependent branch
    assert cov.covariance().device.type == "meta"
    assert cov.covariance().shape == (2, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compute_stays_on_cuda():
    rng = np.random.default_rng(0)
    x = drifting(rng, 2000, 16, 1e4)
    stat = Covariance()
    for part in torch.from_numpy(x).cuda().split(500):
        stat.update(part)
    assert stat.covariance().device.type == "cuda"
    ref = np.cov(x.astype(np.float64), rowvar=False)
    assert rel_err(stat.covariance().cpu(), ref) <= 1e-6


@pytest.mark.parametrize("kind", [Variance, Covariance])
def test_jumping_mean_keeps_accuracy(kind):
    """Batches whose means sit 1e4 standard deviations apart (centring on the running
    mean alone would cancel catastrophically) still give float32-level accuracy."""
    rng = np.random.default_rng(11)
    parts = [drifting(rng, 500, 40, offset) for offset in (0.0, 1e4, -5e3, 1e4, 3.0)]
    x = np.concatenate(parts)
    stat = stream(kind(), x, [slice(i * 500, (i + 1) * 500) for i in range(5)])
    ref = x.astype(np.float64)
    assert rel_err(stat.variance(), ref.var(0, ddof=1)) <= 1e-6
    assert np.all(np.abs(stat.mean().numpy() - ref.mean(0)) <= 1e-6 * ref.std(0))


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(2, 1000),
    c=st.one_of(st.integers(1, 6), st.integers(32, 48)),
    dtype=st.sampled_from(
        [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32]
    ),
)
def test_input_dtypes(seed, n, c, dtype):
    """Half, bfloat16 and integer inputs are computed in float32, float64 input in
    float64; each against numpy float64 on the very same values."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(drifting(rng, n, c, 100.0) * 10).to(dtype)
    stat = Covariance()
    for part in x.split(max(1, n // 3)):
        stat.update(part)
    ref = np.atleast_2d(np.cov(x.double().numpy(), rowvar=False))
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    if np.linalg.norm(ref) > 0:
        assert rel_err(stat.covariance(), ref) <= tol
