"""Conditional and Combined against direct per-group computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from nethook.stats import from_state_dict
from nethook.stats.base import states_equal
from nethook.stats.compose import Combined, Conditional
from nethook.stats.moments import Covariance, Mean, Variance
from nethook.stats.topk import TopK


def labelled(seed: int, n: int, c: int, keys: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c)) + rng.integers(0, 3, (1, c))
    labels = rng.integers(-1, keys, n)  # -1: no condition
    return torch.from_numpy(x), torch.from_numpy(labels)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 300),
    keys=st.integers(1, 6),
    cut=st.floats(0, 1),
)
def test_conditional_mean_per_label_and_merge_equals_one_pass(seed, n, keys, cut):
    x, labels = labelled(seed, n, 3, keys)
    one = Conditional(lambda: Mean(dtype=torch.float64))
    one.update(x, labels)
    k = int(cut * n)
    a, b = (
        Conditional(lambda: Mean(dtype=torch.float64)),
        Conditional(lambda: Mean(dtype=torch.float64)),
    )
    a.update(x[:k], labels[:k])
    b.update(x[k:], labels[k:])
    a.merge(b)
    present = sorted(set(labels.tolist()) - {-1})
    assert one.keys() == a.keys() == present
    for key in present:
        want = x[labels == key].numpy().mean(0)
        assert one[key].count == a[key].count == int((labels == key).sum())
        np.testing.assert_allclose(one[key].mean().numpy(), want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(a[key].mean().numpy(), want, rtol=1e-12, atol=1e-12)


def test_conditional_mask_single_key_and_row_selected_arguments():
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    mask = torch.tensor([[True, False], [True, True], [False, True], [False, False]])
    stat = Conditional(lambda: TopK(1))
    stat.update(x, mask, torch.tensor([10, 11, 12, 13]))  # per-row sample ids follow the rows
    assert stat.keys() == [0, 1]
    assert stat[0].values().item() == 2.0 and stat[0].indices().item() == 11
    assert stat[1].values().item() == 3.0 and stat[1].indices().item() == 12
    stat.update(torch.tensor([[9.0]]), "extra", torch.tensor([99]))
    assert stat["extra"].indices().item() == 99
    assert stat.keys() == [0, 1, "extra"]


def test_conditional_round_trip_keeps_creating_keys_without_the_factory():
    x, labels = labelled(1, 200, 4, 3)
    stat = Conditional(lambda: TopK(5, largest=False))
    stat.update(x[:100], labels[:100], 0)
    restored = from_state_dict(stat.state_dict())
    assert states_equal(stat.state_dict(), restored.state_dict())
    rows = torch.arange(100, 200)
    new_labels = labels[100:] + 10  # keys never seen before
    stat.update(x[100:], new_labels, rows)
    restored.update(x[100:], new_labels, rows)
    assert states_equal(stat.state_dict(), restored.state_dict())
    assert restored[12].k == 5 and restored[12].largest is False


def test_conditional_of_covariance_matches_numpy():
    x, labels = labelled(2, 500, 3, 2)
    stat = Conditional(Covariance)
    for part, lab in zip(x.split(128), labels.split(128), strict=True):
        stat.update(part.float(), lab)
    for key in stat:
        ref = np.cov(x[labels == key].float().double().numpy(), rowvar=False)
        assert np.abs(stat[key].covariance().numpy() - ref).max() <= 1e-6 * np.abs(ref).max()


def test_conditional_errors_name_expected_and_got():
    stat = Conditional(Mean)
    with pytest.raises(ValueError, match=r"4 per-row keys.*got shape \(3,\)"):
        stat.update(torch.zeros(4, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="must be integers, got torch.float32"):
        stat.update(torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="must be boolean"):
        stat.update(torch.zeros(4, 2), torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="factory must return a Stat, got int"):
        Conditional(lambda: 3)
    with pytest.raises(TypeError, match="Conditional of Variance into Conditional of Mean"):
        stat.merge(Conditional(Variance))
    with pytest.raises(ValueError, match=r"TopK\(k=3.*into Conditional of TopK\(k=5"):
        Conditional(lambda: TopK(5)).merge(Conditional(lambda: TopK(3)))


def test_conditional_xarray_stacks_conditions():
    x, labels = labelled(3, 100, 2, 3)
    stat = Conditional(Mean)
    stat.update(x, labels)
    ds = stat.to_xarray()
    assert ds["mean"].dims == ("condition", "unit")
    assert ds.condition.values.tolist() == stat.keys()
    np.testing.assert_allclose(ds["mean"].sel(condition=1).values, stat[1].mean().numpy())


def test_combined_update_merge_round_trip():
    x, _ = labelled(4, 300, 3, 1)
    x = x.float()

    def make():
        return Combined(mean=Mean(), var=Variance(), top=TopK(4))

    one, a, b = make(), make(), make()
    one.update(x)
    a.update(x[:120])
    b.update(x[120:], top=120)
    a.merge(b)
    assert torch.equal(one["top"].indices(), a["top"].indices())
    np.testing.assert_allclose(a["var"].variance().numpy(), x.double().var(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(a["mean"].mean().numpy(), x.double().mean(0).numpy(), atol=1e-7)
    restored = from_state_dict(a.state_dict())
    assert states_equal(a.state_dict(), restored.state_dict())
    assert set(restored) == {"mean", "var", "top"} and len(restored) == 3
    ds = a.to_xarray()
    assert isinstance(ds, xr.Dataset) and "var/variance" in ds and "top/index" in ds


def test_combined_refusals():
    with pytest.raises(ValueError, match="without '/'"):
        Combined({"a/b": Mean()})
    with pytest.raises(TypeError, match=r"Combined\['m'\] must be a Stat, got int"):
        Combined(m=1)
    with pytest.raises(ValueError, match=r"stats \['m', 'v'\] into Combined with stats \['m'\]"):
        Combined(m=Mean()).merge(Combined(m=Mean(), v=Variance()))
    with pytest.raises(TypeError, match="cannot merge Mean into Combined"):
        Combined(m=Mean()).merge(Mean())
