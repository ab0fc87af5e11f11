"""Saving and loading stats (Zarr v3 and .npz), atomic writes, and the key-checked cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from nethook.hashing import content_key
from nethook.stats.base import states_equal
from nethook.stats.compose import Combined, Conditional
from nethook.stats.moments import Covariance, CrossCovariance, Mean, SecondMoment, Variance
from nethook.stats.persist import cached, load, load_zarr_group, read_attrs, read_key, save
from nethook.stats.topk import TopK

FORMATS = ["stat.npz", "stat.zarr"]


def filled_stats() -> dict[str, object]:
    """One stat of every kind, fed some data (including an empty and a nested one)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g) * 3 + 1e4
    labels = torch.randint(0, 3, (64,), generator=g)
    stats = {
        "mean": Mean(),
        "variance": Variance(dtype=torch.float64),
        "covariance": Covariance(),
        "second": SecondMoment(),
        "topk": TopK(4, largest=False),
        "empty": Covariance(),
    }
    for name, stat in stats.items():
        if name != "empty":
            stat.update(x)
    cross = CrossCovariance()
    cross.update(x[:, :2], x[:, 2:])
    stats["cross"] = cross
    cond = Conditional(lambda: Combined(mean=Mean(), top=TopK(2)))
    cond.update(x, labels)
    cond.update(x[:3], "string key")
    stats["conditional"] = cond
    stats["empty_conditional"] = Conditional(Variance)
    for extra in _other_helpers_stats(x):
        stats[type(extra).__name__] = extra
    return stats


def _other_helpers_stats(x: torch.Tensor) -> list:
    """Stats from modules other helpers own, when present: they share the contract."""
    out = []
    try:
        from nethook.stats.histogram import Bincount, Histogram
    except ImportError:
        pass
    else:
        for stat in (Histogram(bins=8), Histogram(bins=4, range=(9990.0, 10010.0))):
            stat.update(x)
            out.append(stat)
        counts = Bincount()
        counts.update((x.long() % 7).abs())
        out.append(counts)
    try:
        from nethook.stats.quantile import Quantile
    except ImportError:
        pass
    else:
        q = Quantile(k=64, tail_k=32, k_min=16)
        q.update(torch.randn(2000, 3))
        out.append(q)
    return out


@pytest.mark.parametrize("filename", FORMATS)
def test_every_stat_round_trips_exactly(tmp_path, filename):
    for name, stat in filled_stats().items():
        path = save(stat, tmp_path / name / filename, key=f"k-{name}", attrs={"layer": name})
        loaded = load(path)
        assert type(loaded) is type(stat), name
        assert states_equal(loaded.state_dict(), stat.state_dict()), name
        assert read_key(path) == f"k-{name}"
        assert read_attrs(path) == {"layer": name}


def test_npz_has_no_pickled_member_and_zarr_is_browsable(tmp_path):
    stat = filled_stats()["conditional"]
    npz = save(stat, tmp_path / "c.npz")
    with np.load(npz, allow_pickle=False) as data:
        assert all(data[name].dtype != object for name in data.files)
    import zarr

    zpath = save(stat, tmp_path / "c.zarr")
    group = zarr.open_group(store=str(zpath), mode="r")
    assert group["stats/0/stats/top/indices"].shape == (5, 2)
    assert states_equal(load_zarr_group(group).state_dict(), stat.state_dict())


@pytest.mark.parametrize("filename", FORMATS)
def test_overwrite_and_no_leftovers(tmp_path, filename):
    a, b = Mean(), Mean()
    a.update(torch.ones(2, 3))
    b.update(torch.zeros(2, 3))
    save(a, tmp_path / filename)
    save(b, tmp_path / filename)
    assert torch.equal(load(tmp_path / filename).mean(), b.mean())
    assert sorted(p.name for p in tmp_path.iterdir()) == [filename]


@pytest.mark.parametrize("filename", FORMATS)
def test_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path, filename, monkeypatch):
    old = Mean()
    old.update(torch.ones(2, 3))
    save(old, tmp_path / filename, key="old")

    class Broken(Mean):
        def state_dict(self):
            sd = super().state_dict()
            sd["bad"] = object()  # not storable: the write fails after it started
            return sd

    new = Broken()
    new.update(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="'bad' is a object"):
        save(new, tmp_path / filename, key="new")
    assert read_key(tmp_path / filename) == "old"
    assert torch.equal(load(tmp_path / filename).mean(), old.mean())
    assert sorted(p.name for p in tmp_path.iterdir()) == [filename]


@pytest.mark.parametrize("filename", FORMATS)
def test_cached_reuses_only_a_matching_key(tmp_path, filename):
    path = tmp_path / filename
    calls = []

    def compute(value):
        def run():
            calls.append(value)
            stat = Mean()
            stat.update(torch.full((2, 2), float(value)))
            return stat

        return run

    key1 = content_key(model="weights-1", layer="layer3", samples=100)
    key2 = content_key(model="weights-2", layer="layer3", samples=100)
    first = cached(path, key1, compute(1))
    again = cached(path, key1, compute(99))
    assert calls == [1] and torch.equal(first.mean(), again.mean())
    changed = cached(path, key2, compute(2))  # e.g. a retrained model: never stale
    assert calls == [1, 2] and changed.mean().tolist() == [2.0, 2.0]
    assert read_key(path) == key2


def test_cached_recomputes_over_an_unreadable_file(tmp_path):
    path = tmp_path / "s.npz"
    path.write_bytes(b"not a zip file")
    stat = cached(path, "k", lambda: Mean())
    assert isinstance(stat, Mean) and read_key(path) == "k"
    path.write_bytes(path.read_bytes()[:40])  # a truncated write from elsewhere
    assert isinstance(cached(path, "k", lambda: Variance()), Variance)
    broken = tmp_path / "z.zarr"
    broken.mkdir()
    (broken / "zarr.json").write_text("{not json")
    assert isinstance(cached(broken, "k", lambda: Variance()), Variance)
    assert read_key(broken) == "k"
    with pytest.raises(TypeError, match="must be a str"):
        cached(path, 3, Mean)
    with pytest.raises(TypeError, match="must return a Stat, got int"):
        cached(tmp_path / "t.npz", "k", lambda: 3)


def test_newer_versions_are_refused_naming_both(tmp_path):
    stat = Mean()
    stat.update(torch.ones(2, 2))
    path = save(stat, tmp_path / "m.npz")
    with np.load(path, allow_pickle=False) as data:
        members = {name: data[name] for name in data.files}
    manifest = json.loads(str(members["__nethook__"]))
    manifest["scalars"]["version"] = ["int", Mean.version + 1]
    members["__nethook__"] = np.array(json.dumps(manifest))
    np.savez(path, **members)
    with pytest.raises(
        ValueError, match=f"format version {Mean.version + 1}, newer than version {Mean.version}"
    ):
        load(path)
    manifest["format"] = 99
    members["__nethook__"] = np.array(json.dumps(manifest))
    np.savez(path, **members)
    with pytest.raises(ValueError, match="storage format version 99, newer than version 1"):
        load(path)


def test_bad_paths_and_groups_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved stat at"):
        load(tmp_path / "missing.npz")
    import zarr

    zarr.open_group(store=str(tmp_path / "plain.zarr"), mode="w", zarr_format=3)
    with pytest.raises(ValueError, match="holds no nethook stat"):
        load(tmp_path / "plain.zarr")
    bad = Combined(m=Mean())
    bad.stats["m"].state_dict = lambda: {"class": "Mean", "version": 1, "x/y": 1}
    with pytest.raises(ValueError, match="keys must be non-empty str without '/'"):
        save(bad, tmp_path / "bad.npz")
    assert not os.listdir(tmp_path / "plain.zarr") == []
    assert not any(p.name.startswith(".") for p in Path(tmp_path).iterdir())


def test_docs_examples_run(tmp_path, monkeypatch):
    """The python examples of docs/stats.md (except the Quantile and IoU sections,
    which their own tests cover) run as written."""
    import re

    text = (Path(__file__).parents[2] / "docs" / "stats.md").read_text()
    sections = re.split(r"^## ", text, flags=re.M)
    mine = [s for s in sections if not s.startswith(("Quantile", "IoU"))]
    blocks = [b for s in mine for b in re.findall(r"```python\n(.*?)```", s, flags=re.S)]
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "docs/stats.md", "exec"), {})
