"""PairIoU against brute-force counts: any split merged equals one pass, both kernels agree."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nethook.stats import pair_iou
from nethook.stats.base import from_state_dict, states_equal
from nethook.stats.pair_iou import PairIoU, present_pairs

SETTINGS = settings(max_examples=40, deadline=None)


def brute_force(acts: np.ndarray, thr: np.ndarray, presence: np.ndarray):
    """``(intersection, unit_area, label_area)`` by comparing every pixel with every pair."""
    units, k = thr.shape
    inter = np.zeros((units, k), np.int64)
    area = np.zeros((units, k), np.int64)
    for u in range(units):
        for c in range(k):
            on = acts[:, u] > thr[u, c]
            area[u, c] = on.sum()
            inter[u, c] = (on & presence[:, c]).sum()
    return inter, area, presence.sum(0).astype(np.int64)


@st.composite
def case(draw):
    """Tie-heavy activations (with NaN and infinities), thresholds often equal to an
    activation, random presence, and a split of the rows into parts."""
    seed = draw(st.integers(0, 2**32 - 1))
    n, units, k = draw(st.integers(0, 120)), draw(st.integers(1, 5)), draw(st.integers(1, 6))
    rng = np.random.default_rng(seed)
    acts = rng.integers(-3, 4, size=(n, units)).astype(np.float32)
    if draw(st.booleans()):
        acts += rng.standard_normal((n, units)).astype(np.float32)
    special = rng.random((n, units))
    acts[special < 0.03] = np.nan
    acts[(special >= 0.03) & (special < 0.05)] = np.inf
    acts[(special >= 0.05) & (special < 0.07)] = -np.inf
    thr = rng.integers(-3, 4, size=(units, k)).astype(np.float64)
    thr[rng.random((units, k)) < 0.1] = np.inf
    thr[rng.random((units, k)) < 0.1] = -np.inf
    presence = rng.random((n, k)) < rng.random()
    cuts = np.sort(rng.integers(0, n + 1, draw(st.integers(0, 3))))
    return acts, thr, presence, [0, *cuts.tolist(), n]


def tally(acts, thr, presence, bounds, **kwargs) -> PairIoU:
    """Each part in its own stat, merged into the first."""
    stats = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        s = PairIoU(thr, **kwargs)
        s.update(torch.as_tensor(acts[a:b]), torch.as_tensor(presence[a:b]))
        stats.append(s)
    for s in stats[1:]:
        stats[0].merge(s)
    return stats[0]


def assert_counts(stat: PairIoU, acts, thr, presence) -> None:
    inter, area, label = brute_force(acts, thr, presence)
    np.testing.assert_array_equal(stat.intersection.numpy(), inter)
    np.testing.assert_array_equal(stat.unit_area.numpy(), area)
    np.testing.assert_array_equal(stat.label_area.numpy(), label)
    assert stat.intersection.dtype == torch.int64
    assert stat.count == len(acts)


@contextmanager
def kernel(numpy_on_cpu: bool):
    """Run the CPU (numpy) kernel or the torch (accelerator) one."""
    saved = pair_iou.NUMPY_ON_CPU
    pair_iou.NUMPY_ON_CPU = numpy_on_cpu
    try:
        yield
    finally:
        pair_iou.NUMPY_ON_CPU = saved


KERNELS = pytest.mark.parametrize("numpy_on_cpu", [True, False], ids=["numpy", "torch"])


@KERNELS
@SETTINGS
@given(case())
def test_any_split_merged_equals_brute_force(numpy_on_cpu, data):
    acts, thr, presence, bounds = data
    with kernel(numpy_on_cpu):
        stat = tally(acts, thr, presence, bounds)
    assert_counts(stat, acts, thr, presence)
    inter, area, label = brute_force(acts, thr, presence)
    union = area + label[None, :] - inter
    want = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    np.testing.assert_allclose(stat.iou().numpy(), want, rtol=0, atol=1e-12)


@SETTINGS
@given(case())
def test_state_round_trip_is_exact_and_resumable(data):
    acts, thr, presence, bounds = data
    half = bounds[len(bounds) // 2]
    first = PairIoU(thr, concepts=list(range(10, 10 + thr.shape[1])))
    first.update(torch.as_tensor(acts[:half]), torch.as_tensor(presence[:half]))
    back = from_state_dict(first.state_dict())
    assert isinstance(back, PairIoU) and states_equal(back.state_dict(), first.state_dict())
    back.update(torch.as_tensor(acts[half:]), torch.as_tensor(presence[half:]))
    assert_counts(back, acts, thr, presence)
    assert back.concepts == list(range(10, 10 + thr.shape[1]))


@KERNELS
@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), layers=st.integers(1, 4))
def test_id_maps_count_like_the_presence_they_imply(numpy_on_cpu, seed, layers):
    """Integer ids per label layer (0 = none, unknown ids, repeats) = the boolean matrix."""
    rng = np.random.default_rng(seed)
    n, units = 80, 3
    ids = np.array([2, 5, 9])
    labels = rng.choice([0, 2, 5, 9, 7, 40], size=(n, layers))
    presence = (labels[:, :, None] == ids[None, None, :]).any(1)
    acts = rng.standard_normal((n, units)).astype(np.float32)
    thr = rng.standard_normal((units, len(ids)))
    stat = PairIoU(thr, concepts=ids)
    with kernel(numpy_on_cpu):
        stat.update(torch.as_tensor(acts), torch.as_tensor(labels))
    assert_counts(stat, acts, thr, presence)


def test_xarray_view_names_its_dims():
    thr = np.array([[0.5, 2.0], [-1.0, np.inf]])
    stat = PairIoU(thr, concepts=["sky", "tree"])
    acts = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, -2.0]])
    presence = torch.tensor([[True, False], [True, True], [False, False]])
    stat.update(acts, presence)
    ds = stat.to_xarray(units=["a", "b"])
    assert ds["iou"].dims == ("unit", "concept") and ds["label_area"].dims == ("concept",)
    assert list(ds["concept"].values) == ["sky", "tree"]
    # unit a on sky: mask {0, 1}, sky {0, 1}: IoU 1; unit a on tree: mask {1}, tree {1}: 1
    assert ds["iou"].sel(unit="a").values.tolist() == [1.0, 1.0]
    # unit b on sky: mask {0, 1} (> -1), sky {0, 1}: 1; on tree: never on, tree {1}: 0
    assert ds["iou"].sel(unit="b").values.tolist() == [1.0, 0.0]
    assert ds.attrs["count"] == 3


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"thresholds must be \[units, concepts\]"):
        PairIoU(np.zeros(3))
    with pytest.raises(ValueError, match="must not be NaN"):
        PairIoU(np.array([[np.nan]]))
    with pytest.raises(ValueError, match="2 concept labels for 3"):
        PairIoU(np.zeros((1, 3)), concepts=[1, 2])
    stat = PairIoU(np.zeros((2, 3)), concepts=["a", "b", "c"])
    with pytest.raises(ValueError, match="has 2 channels, got a batch with 4"):
        stat.update(torch.zeros(5, 4), torch.zeros(5, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"presence has 2 columns; expected one per concept \(3\)"):
        stat.update(torch.zeros(5, 2), torch.zeros(5, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"with N = 5 rows .* got shape \(4, 3\)"):
        stat.update(torch.zeros(5, 2), torch.zeros(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="boolean or integer ids, got torch.float32"):
        stat.update(torch.zeros(5, 2), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="needs integer `concepts`"):
        stat.update(torch.zeros(5, 2), torch.zeros(5, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="cannot merge PairIoU with thresholds"):
        stat.merge(PairIoU(np.ones((2, 3)), concepts=["a", "b", "c"]))
    with pytest.raises(TypeError, match="same kind"):
        stat.merge(object())


@KERNELS
@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), layers=st.integers(1, 4), n=st.integers(0, 40))
def test_present_pairs_are_sorted_unique_and_complete(numpy_on_cpu, seed, layers, n):
    rng = np.random.default_rng(seed)
    concepts = [3, 1, 8]
    labels = rng.choice([0, 1, 3, 8, 5], size=(n, layers))
    want = sorted({(concepts.index(v), i) for i in range(n) for v in labels[i] if v in concepts})
    with kernel(numpy_on_cpu):
        rows, cols = present_pairs(torch.as_tensor(labels), concepts)
        presence = torch.as_tensor(rng.random((n, 3)) < 0.4)
        brows, bcols = present_pairs(presence)
    assert list(zip(cols.tolist(), rows.tolist(), strict=True)) == want
    bwant = sorted((c, i) for i, c in zip(*np.nonzero(presence.numpy()), strict=True))
    assert list(zip(bcols.tolist(), brows.tolist(), strict=True)) == bwant
