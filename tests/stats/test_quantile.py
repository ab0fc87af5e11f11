"""Quantile sketch against exact ranks: bound, ties, tails, merge, state, bad input."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nethook.stats.quantile as quantile_module
from nethook.stats.base import from_state_dict
from nethook.stats.quantile import Quantile

SMALL = {"k": 64, "tail_k": 32, "k_min": 8, "tail": 0.05}  # compacts after a few hundred rows
QS = np.array([0.0, 0.001, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 1.0])
KINDS = ["normal", "relu", "ints", "lognormal", "constant", "inf"]
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "int32": torch.int32,
}
FAST = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def make_data(seed: int, n: int, channels: int, kind: str, nan: float) -> np.ndarray:
    """``[n, C]`` float64 data of a kind with known ties/tails, NaN share ``nan``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, channels))
    if kind == "relu":  # 50-90% exact zeros
        x = np.maximum(x - np.linspace(0.0, 1.3, channels), 0.0)
    elif kind == "ints":  # heavy ties everywhere
        x = rng.integers(0, 4, (n, channels)).astype(np.float64)
    elif kind == "lognormal":
        x = np.exp(2 * x)
    elif kind == "constant":
        x = np.full((n, channels), 3.0)
    elif kind == "inf":
        x[rng.random((n, channels)) < 0.05] = np.inf
        x[rng.random((n, channels)) < 0.05] = -np.inf
    if nan:
        x[rng.random((n, channels)) < nan] = np.nan
    return x


def as_tensor(x: np.ndarray, dtype: str) -> torch.Tensor:
    """The data in the given dtype (ints are rounded first)."""
    t = torch.from_numpy(np.where(np.isfinite(x), x, 0).round() if dtype == "int32" else x)
    return t.to(DTYPES[dtype])


def stored(x: torch.Tensor) -> np.ndarray:
    """What the sketch stores for ``x``: float64 stays, everything else is float32."""
    return x.double().numpy() if x.dtype == torch.float64 else x.float().double().numpy()


def rank_errors(x: np.ndarray, answers: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """``[C, Q]`` distance from q to ``[F(v-), F(v)]`` for each answer v (NaN excluded)."""
    errors = np.zeros(answers.shape)
    for c in range(x.shape[1]):
        col = np.sort(x[:, c][~np.isnan(x[:, c])])
        if col.size == 0:
            assert np.isnan(answers[c]).all()
            continue
        below = np.searchsorted(col, answers[c], "left") / col.size
        at_most = np.searchsorted(col, answers[c], "right") / col.size
        errors[c] = np.maximum(0.0, np.maximum(below - qs, qs - at_most))
    return errors


def feed(sketch: Quantile, x: torch.Tensor, cuts: list[int]) -> Quantile:
    """Update ``sketch`` with ``x`` split at ``cuts`` (row indices)."""
    bounds = [0, *sorted(c % (x.shape[0] + 1) for c in cuts), x.shape[0]]
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        sketch.update(x[a:b])
    return sketch


def assert_within_bound(sketch: Quantile, x: np.ndarray, qs: np.ndarray = QS) -> np.ndarray:
    errors = rank_errors(x, sketch.quantiles(qs).numpy(), qs)
    bound = sketch.rank_error_bound(qs).numpy()
    assert (errors <= bound + 1e-12).all(), (errors - bound).max()
    return errors


@FAST
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(1, 1500),
    channels=st.integers(1, 5),
    kind=st.sampled_from(KINDS),
    dtype=st.sampled_from(list(DTYPES)),
    cuts=st.lists(st.integers(0, 1500), max_size=4),
)
def test_exact_while_nothing_is_compacted(seed, n, channels, kind, dtype, cuts):
    x = as_tensor(make_data(seed, n, channels, kind, 0.1 if dtype != "int32" else 0), dtype)
    sketch = feed(Quantile(k=2048), x, cuts)
    assert sketch.rank_error_bound().max() == 0
    data = stored(x)
    expected = np.stack(
        [
            np.nanquantile(data[:, c], QS, method="inverted_cdf")
            if not np.isnan(data[:, c]).all()
            else np.full(len(QS), np.nan)
            for c in range(channels)
        ]
    )
    np.testing.assert_array_equal(sketch.quantiles(QS).numpy(), expected)
    assert sketch.count == n
    np.testing.assert_array_equal(sketch.nan_count.numpy(), np.isnan(data).sum(0))


@FAST
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(500, 30000),
    channels=st.integers(1, 4),
    kind=st.sampled_from(KINDS),
    dtype=st.sampled_from(list(DTYPES)),
    nan=st.sampled_from([0.0, 0.2]),
    cuts=st.lists(st.integers(0, 30000), max_size=6),
)
def test_rank_error_within_stated_bound(seed, n, channels, kind, dtype, nan, cuts):
    x = as_tensor(make_data(seed, n, channels, kind, nan if dtype != "int32" else 0), dtype)
    sketch = feed(Quantile(**SMALL, seed=seed % 7), x, cuts)
    assert_within_bound(sketch, stored(x))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31),
    parts=st.integers(2, 6),
    kind=st.sampled_from(KINDS),
    order=st.permutations(range(6)),
    data=st.data(),
)
def test_merge_of_any_split_is_within_bound(seed, parts, kind, order, data):
    n = data.draw(st.integers(parts, 20000))
    x = make_data(seed, n, 3, kind, 0.05)
    cuts = sorted(data.draw(st.lists(st.integers(0, n), min_size=parts - 1, max_size=parts - 1)))
    bounds = [0, *cuts, n]
    shards = []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        shard = Quantile(**SMALL, seed=i)
        shard.update(torch.from_numpy(x[a:b]))
        shards.append(shard)
    # Merge in a random tree: repeatedly merge two shards chosen by `order`.
    while len(shards) > 1:
        i = order[len(shards) % len(order)] % len(shards)
        j = (i + 1) % len(shards)
        shards[i].merge(shards[j])
        shards.pop(j)
    merged = shards[0]
    assert merged.count == n
    np.testing.assert_array_equal(merged.nan_count.numpy(), np.isnan(x).sum(0))
    assert_within_bound(merged, x)


@pytest.mark.parametrize("order", ["ascending", "descending"])
def test_sorted_streams_stay_within_the_reported_bound(order):
    """Drift is the threshold's worst case: the bound reported per q still holds."""
    x = np.sort(make_data(8, 60_000, 2, "normal", 0.0), axis=0)
    x = x if order == "ascending" else x[::-1].copy()
    sketch = feed(Quantile(**SMALL), torch.from_numpy(x), list(range(0, 60_000, 4000)))
    assert_within_bound(sketch, x)


def test_merge_is_exact_while_small_and_associative():
    x = make_data(3, 900, 4, "ints", 0.1)
    a, b, c = (Quantile(k=4096) for _ in range(3))
    a.update(torch.from_numpy(x[:300]))
    b.update(torch.from_numpy(x[300:650]))
    c.update(torch.from_numpy(x[650:]))
    left = a.copy()
    left.merge(b)
    left.merge(c)
    bc = b.copy()
    bc.merge(c)
    right = a.copy()
    right.merge(bc)
    np.testing.assert_array_equal(left.quantiles(QS).numpy(), right.quantiles(QS).numpy())
    expected = np.nanquantile(x, QS, axis=0, method="inverted_cdf").T
    np.testing.assert_array_equal(left.quantiles(QS).numpy(), expected.astype(np.float32))


def test_relu_medians_and_saturation_ties_are_exact():
    """Ties: ReLU zeros (t-digest misses these medians by 0.2-0.45) and a saturated top."""
    rng = np.random.default_rng(0)
    n = 400_000
    zeros = np.array([0.55, 0.7, 0.9, 0.6])
    x = rng.standard_normal((n, 4)).astype(np.float32)
    x = np.maximum(x - np.quantile(x, zeros, axis=0).diagonal(), 0)
    x[:, 3] = np.minimum(x[:, 3], np.quantile(x[:, 3], 0.97))  # 3% tied at the top
    sketch = Quantile()
    for i in range(0, n, 10_000):
        sketch.update(torch.from_numpy(x[i : i + 10_000]))
    assert sketch.rank_error_bound().max() > 0  # compacted: this is the sketch, not exact
    medians = sketch.quantiles([0.5, 0.54]).numpy()
    np.testing.assert_array_equal(medians, np.zeros((4, 2)))
    top = sketch.quantiles([0.98, 0.99, 0.995]).numpy()[3]
    np.testing.assert_array_equal(top, np.full(3, x[:, 3].max()))
    assert_within_bound(sketch, x.astype(np.float64))
    # cdf at zero is the share of zeros
    np.testing.assert_allclose(sketch.cdf(0.0).numpy(), (x <= 0).mean(0), atol=2e-3)


def tail_errors(n: int, channels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Max rank errors and bounds at q in [0.99, 0.999] for mixed data of ``n`` rows."""
    rng = np.random.default_rng(seed)
    qs = np.array([0.5, 0.9, 0.99, 0.995, 0.999])
    x = rng.standard_normal((n, channels)).astype(np.float32)
    x[:, ::2] = np.maximum(x[:, ::2] - 0.5, 0)  # ReLU channels
    x[:, 1::4] = np.exp(x[:, 1::4])  # heavy tails
    sketch = Quantile()
    step = 1 << 16
    for i in range(0, n, step):
        sketch.update(torch.from_numpy(x[i : i + step]))
    errors = assert_within_bound(sketch, x.astype(np.float64), qs)
    assert sketch.nbytes_per_channel() <= 64 * 1024
    return errors.max(0), sketch.rank_error_bound(qs).numpy().max(0)


def test_tails_are_accurate_at_ten_million():
    errors, bound = tail_errors(10_000_000, 2)
    assert (errors[2:] <= 1e-4).all(), errors
    assert (bound[2:] <= 1.5e-4).all(), bound  # the stated tail bound
    assert (bound[:2] <= 2e-3).all(), bound  # the stated body bound


@pytest.mark.slow
def test_tails_are_accurate_at_ten_million_on_many_channels():
    errors, bound = tail_errors(10_000_000, 16, seed=1)
    assert (errors[2:] <= 1e-4).all(), errors
    assert (bound[2:] <= 1.5e-4).all(), bound


def test_memory_is_bounded():
    """State never exceeds its budget, and the budget stays under 64 KiB up to N=2**36."""
    sketch = Quantile()
    x = torch.randn(1 << 20, 2)
    for _ in range(2):
        sketch.update(x)
    assert sketch.nbytes_per_channel() <= sketch.max_nbytes_per_channel(sketch.count)
    assert sketch.max_nbytes_per_channel(2**36) <= 64 * 1024
    assert sketch.max_nbytes_per_channel(2**20) < sketch.max_nbytes_per_channel(2**36)


def test_nan_and_inf_are_counted_and_ranked():
    x = np.array(
        [[1.0, np.nan, np.inf], [np.nan, np.nan, -np.inf], [3.0, np.nan, 0.0], [2.0, np.nan, 5.0]]
    )
    sketch = Quantile()
    sketch.update(torch.from_numpy(x))
    np.testing.assert_array_equal(sketch.nan_count.numpy(), [1, 4, 0])
    np.testing.assert_array_equal(sketch.min().numpy(), [1.0, np.nan, -np.inf])
    np.testing.assert_array_equal(sketch.max().numpy(), [3.0, np.nan, np.inf])
    out = sketch.quantiles([0.0, 0.5, 1.0]).numpy()
    np.testing.assert_array_equal(out[0], [1.0, 2.0, 3.0])
    assert np.isnan(out[1]).all()
    np.testing.assert_array_equal(out[2], [-np.inf, 0.0, np.inf])
    cdf = sketch.cdf(torch.tensor([2.0, 0.0, np.inf])).numpy()
    np.testing.assert_array_equal(cdf[[0, 2]], [2 / 3, 1.0])
    assert np.isnan(cdf[1])


def test_cdf_shapes_and_accuracy():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((50_000, 3))
    sketch = Quantile(**SMALL)
    sketch.update(torch.from_numpy(x))
    grid = np.array([[-1.0, 0.0, 2.5]] * 3)
    exact = (x[:, :, None] <= grid[None]).mean(0)
    bound = sketch.rank_error_bound().numpy()[:, None]
    assert (np.abs(sketch.cdf(grid).numpy() - exact) <= bound + 1e-12).all()
    assert sketch.cdf(0.0).shape == (3,)
    assert sketch.cdf(torch.zeros(3)).shape == (3,)
    with pytest.raises(ValueError, match=r"shape \[3\] or \[3, V\]"):
        sketch.cdf(torch.zeros(4))


def test_state_round_trip_is_exact_and_deterministic():
    rng = np.random.default_rng(9)
    x = torch.from_numpy(make_data(1, 6000, 3, "relu", 0.05))
    more = torch.from_numpy(rng.standard_normal((3000, 3)))
    a = feed(Quantile(**SMALL, seed=4), x, [1000, 2500])
    sd = a.state_dict()
    leaves = _leaves(sd)
    assert all(isinstance(v, (np.ndarray, int, float, str)) for v in leaves)
    b = from_state_dict(sd)
    np.testing.assert_array_equal(a.quantiles(QS).numpy(), b.quantiles(QS).numpy())
    a.update(more)
    b.update(more)
    _assert_same_state(a.state_dict(), b.state_dict())
    again = feed(Quantile(**SMALL, seed=4), x, [1000, 2500])
    again.update(more)
    _assert_same_state(a.state_dict(), again.state_dict())
    other_seed = feed(Quantile(**SMALL, seed=5), x, [1000, 2500])
    assert not np.array_equal(
        other_seed.state_dict()["body"]["items"],
        feed(Quantile(**SMALL, seed=4), x, [1000, 2500]).state_dict()["body"]["items"],
    )


def _leaves(sd: dict) -> list:
    out = []
    for value in sd.values():
        out.extend(_leaves(value) if isinstance(value, dict) else [value])
    return out


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _assert_same_state(a[key], b[key])
        else:
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


def test_torch_kernels_match_the_bound(monkeypatch):
    """The accelerator path (torch kernels), run on CPU, obeys the same bound."""
    monkeypatch.setattr(quantile_module, "NUMPY_ON_CPU", False)
    x = make_data(11, 20_000, 3, "relu", 0.05)
    sketch = feed(Quantile(**SMALL), torch.from_numpy(x), [5000, 12000])
    assert isinstance(sketch._body.level(0), torch.Tensor)
    assert_within_bound(sketch, x)
    monkeypatch.setattr(quantile_module, "NUMPY_ON_CPU", True)
    rebuilt = from_state_dict(sketch.state_dict())
    np.testing.assert_array_equal(rebuilt.quantiles(QS).numpy(), sketch.quantiles(QS).numpy())


def test_to_device_keeps_results():
    x = torch.from_numpy(make_data(2, 5000, 2, "lognormal", 0.0))
    sketch = Quantile(**SMALL)
    sketch.update(x)
    before = sketch.quantiles(QS)
    assert sketch.to("cpu") is sketch
    np.testing.assert_array_equal(sketch.quantiles(QS).numpy(), before.numpy())
    if torch.cuda.is_available():
        sketch.to("cuda")
        sketch.update(x.cuda())
        assert sketch.quantiles(QS).device.type == "cuda"
        assert_within_bound(sketch, np.concatenate([x.numpy(), x.numpy()]))


def test_xarray_accessors():
    sketch = Quantile()
    sketch.update(torch.arange(12.0).reshape(6, 2))
    da = sketch.quantile_array([0.5, 1.0], units=["a", "b"])
    assert isinstance(da, xr.DataArray)
    assert da.dims == ("unit", "quantile")
    assert list(da.unit.values) == ["a", "b"]
    assert da.sel(unit="b", quantile=1.0).item() == 11.0
    ds = sketch.to_xarray()
    assert ds["quantiles"].dims == ("unit", "quantile")
    assert ds["max"].values.tolist() == [10.0, 11.0]


def test_bad_input_is_named():
    sketch = Quantile()
    with pytest.raises(ValueError, match="at least one channel"):
        sketch.update(torch.zeros(3, 0))
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        sketch.update(torch.zeros(3, 2, 2))
    sketch.update(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="2 channels, got a batch with 5"):
        sketch.update(torch.zeros(3, 5))
    other = Quantile()
    other.update(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="channels"):
        sketch.merge(other)
    with pytest.raises(ValueError, match="k=128"):
        sketch.merge(Quantile(k=128))
    with pytest.raises(ValueError, match=r"quantiles must be numbers in \[0, 1\]"):
        sketch.quantiles([0.5, 1.5])
    with pytest.raises(ValueError, match="seen no data"):
        Quantile().quantiles([0.5])
    sd = sketch.state_dict()
    sd["version"] = Quantile.version + 1
    with pytest.raises(ValueError, match="newer than version"):
        from_state_dict(sd)
    with pytest.raises(ValueError, match="tail must be"):
        Quantile(tail=0.7)


def test_docs_example_runs():
    """The python examples of the Quantile section of docs/stats.md run as written."""
    doc = (Path(__file__).parents[2] / "docs" / "stats.md").read_text()
    section = doc.split("\n## Quantile\n", 1)[1].split("\n## ", 1)[0]
    examples = re.findall(r"```python\n(.*?)```", section, re.S)
    assert examples
    for example in examples:
        exec(compile(example, "docs/stats.md (Quantile)", "exec"), {})


@pytest.mark.parametrize("name", ["q.npz", "q.zarr"])
def test_saved_and_loaded_through_persist(tmp_path, name):
    from nethook.stats import persist

    x = torch.from_numpy(make_data(4, 8000, 3, "relu", 0.05))
    sketch = feed(Quantile(**SMALL), x, [3000])
    loaded = persist.load(persist.save(sketch, tmp_path / name))
    _assert_same_state(sketch.state_dict(), loaded.state_dict())
    np.testing.assert_array_equal(loaded.quantiles(QS).numpy(), sketch.quantiles(QS).numpy())
