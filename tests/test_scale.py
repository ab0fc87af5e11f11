"""Scale-out on a dask LocalCluster (2 worker processes) gives exactly the local result."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from nethook.runner import StatConsumer, run_store
from nethook.scale import TreeReducer, record, tally_source, tally_store
from nethook.stats.moments import Mean, Variance
from nethook.store import ActivationStore

distributed = pytest.importorskip("distributed")

MODEL_FILE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def build():
        # unit u of conv = (u + 1) * sum of input channels; fc = 2 * mean-pooled conv
        model = nn.Sequential()
        model.add_module("conv", nn.Conv2d(3, 4, 1, bias=False))
        model.add_module("pool", nn.AdaptiveAvgPool2d(1))
        model.add_module("flat", nn.Flatten())
        model.add_module("fc", nn.Linear(4, 4, bias=False))
        with torch.no_grad():
            model.conv.weight.copy_(torch.arange(1.0, 5.0).view(4, 1, 1, 1).expand(4, 3, 1, 1))
            model.fc.weight.copy_(2 * torch.eye(4))
        return model
    """
)


@pytest.fixture(scope="module")
def client():
    import dask
    from distributed import Client, LocalCluster

    # forked workers inherit the imported torch: starting 2 fresh interpreters costs
    # tens of seconds on a busy 2-core machine; they are still separate processes
    with (
        dask.config.set({"distributed.worker.multiprocessing-method": "fork"}),
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            memory_limit="2GiB",
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


@pytest.fixture
def model_spec(tmp_path) -> str:
    path = tmp_path / "tiny_model.py"
    path.write_text(MODEL_FILE)
    return f"{path}:build"


def images(n: int = 30) -> torch.utils.data.TensorDataset:
    """Random images; a TensorDataset is importable on every worker."""
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.rand(n, 3, 5, 5, generator=g))


def stats() -> dict:
    return {"mean": StatConsumer(Mean(), "fc"), "var": StatConsumer(Variance(), "conv")}


def assert_same_state(a: dict, b: dict) -> None:
    for name in a:
        sa, sb = a[name].state_dict(), b[name].state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            np.testing.assert_array_equal(
                np.asarray(sa[key]), np.asarray(sb[key]), err_msg=f"{name}.{key}"
            )


def test_tree_reducer_matches_level_by_level_pairing():
    for n in range(1, 12):
        reducer = TreeReducer(lambda a, b: f"({a}{b})")
        for i in range(n):
            reducer.push(str(i))
        level = [str(i) for i in range(n)]
        while len(level) > 1:
            nxt = [f"({level[i]}{level[i + 1]})" for i in range(0, len(level) - 1, 2)]
            level = nxt + ([level[-1]] if len(level) % 2 else [])
        assert reducer.result() == level[0]


def test_tally_store_on_cluster_equals_local_exactly(tmp_path, model_spec, client):
    source = images(30)
    store = record(
        model_spec,
        source,
        ["conv", "fc"],
        tmp_path / "s.zarr",
        block_samples=4,
        batch_size=4,
        progress=False,
    )
    assert store.n_blocks == 8  # 7 full blocks and one of 2: an unbalanced tree
    local = tally_store(store, stats(), progress=False)
    remote = tally_store(store, stats(), client=client, progress=False)
    assert_same_state(local, remote)
    assert remote["var"].stat.count == 30 * 25  # every pixel of every sample, once
    # a plain sequential pass (another merge order) agrees to the stat's precision
    plain = run_store(store, stats(), batch_size=4, progress=False)
    np.testing.assert_allclose(
        remote["var"].stat.variance(), plain["var"].stat.variance(), rtol=1e-6
    )
    x = np.asarray(store.layer("fc").values, np.float64)
    np.testing.assert_allclose(remote["mean"].stat.mean().numpy(), x.mean(0), rtol=1e-12)


def test_tally_source_on_cluster_equals_local_exactly(model_spec, client):
    source = images(30)
    local = tally_source(model_spec, source, stats(), batch_size=4, shard_samples=8, progress=False)
    remote = tally_source(
        model_spec, source, stats(), client=client, batch_size=4, shard_samples=8, progress=False
    )
    assert_same_state(local, remote)
    assert remote["mean"].stat.count == 30
    conv_input_sum = source.tensors[0].sum(1)  # [N, 5, 5]
    fc0 = 2 * conv_input_sum.mean((1, 2)).double()  # unit 0 of fc
    np.testing.assert_allclose(remote["mean"].stat.mean()[0].item(), fc0.mean().item(), rtol=1e-6)


def test_record_on_cluster_writes_the_same_bytes(tmp_path, model_spec, client):
    source = images(30)
    options = {"block_samples": 4, "batch_size": 4, "progress": False}
    record(model_spec, source, ["conv", "fc"], tmp_path / "local.zarr", **options)
    # a partly recorded store: the cluster fills in only the missing blocks
    record(model_spec, source, ["conv", "fc"], tmp_path / "remote.zarr", samples=30, **options)
    partial = ActivationStore.open(tmp_path / "remote.zarr", "r+")
    for block in (1, 2, 6):
        partial.invalidate(block)
    store = record(
        model_spec, source, ["conv", "fc"], tmp_path / "remote.zarr", client=client, **options
    )
    assert store.is_complete()
    assert tree_bytes(tmp_path / "local.zarr") == tree_bytes(tmp_path / "remote.zarr")


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }
