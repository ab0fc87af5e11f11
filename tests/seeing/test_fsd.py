"""FSD: the closed form on Gaussians, singular covariances, planted segmentations, bad input."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nethook.fsd import (
    frechet_distance,
    load_dataset,
    measure_fsd,
    sqrtm_product,
    stat_distance,
    trace_sqrt_product_eig,
    write_fsd_report,
)
from nethook.stats.moments import Covariance

from .planted import ColorSegmenter, StripeGenerator, StripeSource, true_shares

torch.set_num_threads(1)


def _closed_form_diag(mu1, var1, mu2, var2) -> float:
    """Fréchet distance of Gaussians with diagonal covariances (they commute)."""
    return float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum())


def _rotation(k: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(k, k)))
    return q


@pytest.mark.parametrize("method", ["sqrtm", "eig"])
def test_closed_form_commuting_gaussians(method):
    """Shared eigenvectors: FD = |dmu|^2 + sum (sqrt(l1) - sqrt(l2))^2."""
    q = _rotation(5, 0)
    l1, l2 = np.array([4.0, 1.0, 0.5, 0.1, 2.0]), np.array([1.0, 1.0, 2.0, 0.4, 0.0])
    mu1, mu2 = np.arange(5.0), np.arange(5.0)[::-1]
    got = frechet_distance(mu1, q @ np.diag(l1) @ q.T, mu2, q @ np.diag(l2) @ q.T, method=method)
    assert got == pytest.approx(_closed_form_diag(mu1, l1, mu2, l2), rel=1e-9)


def test_closed_form_non_commuting_2x2():
    """Two 2-d Gaussians with non-commuting covariances, against an explicit formula.

    For 2 x 2 PSD ``M = A B``, ``Tr(M^(1/2)) = sqrt(Tr M + 2 sqrt(det M))``.
    """
    a = np.array([[2.0, 0.5], [0.5, 1.0]])
    b = np.array([[1.0, -0.3], [-0.3, 3.0]])
    m = a @ b
    tr_root = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    expected = 1.0 + np.trace(a) + np.trace(b) - 2 * tr_root
    assert frechet_distance([0, 0], a, [1, 0], b) == pytest.approx(expected, rel=1e-10)


def test_samples_from_known_gaussians_match_closed_form():
    """Streaming Covariance stats of Gaussian samples give the closed form up to sampling error."""
    rng = np.random.default_rng(1)
    mu1, var1 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 0.25, 4.0])
    mu2, var2 = np.array([0.5, 1.0, 1.0]), np.array([2.0, 0.25, 1.0])
    stats = []
    for mu, var in ((mu1, var1), (mu2, var2)):
        stat = Covariance(dtype=torch.float64)
        for _ in range(10):
            stat.update(torch.from_numpy(rng.normal(mu, np.sqrt(var), size=(20000, 3))))
        stats.append(stat)
    expected = _closed_form_diag(mu1, var1, mu2, var2)
    assert stat_distance(*stats) == pytest.approx(expected, rel=0.02)


def test_identical_samples_give_zero():
    x = torch.from_numpy(np.random.default_rng(2).normal(size=(500, 6)))
    a, b = Covariance(dtype=torch.float64), Covariance(dtype=torch.float64)
    a.update(x)
    b.update(x[:250])
    b.update(x[250:])
    assert abs(stat_distance(a, b)) < 1e-10


def test_singular_covariance_class_never_appears():
    """A zero row/column (a class never seen) must not break the root; the result is exact."""
    rng = np.random.default_rng(3)
    x = rng.dirichlet([1, 2, 3], size=400)
    y = rng.dirichlet([2, 2, 1], size=400)
    pad = lambda v: np.concatenate([v, np.zeros((len(v), 1))], 1)  # noqa: E731
    full = frechet_distance(pad(x).mean(0), np.cov(pad(x).T), pad(y).mean(0), np.cov(pad(y).T))
    reduced = frechet_distance(x.mean(0), np.cov(x.T), y.mean(0), np.cov(y.T), method="eig")
    assert np.isfinite(full)
    assert full == pytest.approx(reduced, rel=1e-6, abs=1e-12)
    # shares sum to 1, so each covariance is itself singular: root still real and finite
    root = sqrtm_product(np.cov(pad(x).T), np.cov(pad(y).T))
    assert np.isrealobj(root) and np.isfinite(root).all()


def test_sqrtm_rank_one_product():
    """A rank-one product, where scipy's sqrtm alone is unstable."""
    v = np.array([[1.0], [2.0], [0.0]])
    a = v @ v.T
    b = np.eye(3)
    assert np.trace(sqrtm_product(a, b)) == pytest.approx(np.sqrt(5.0), rel=1e-4)


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(1, 6),
    rank1=st.integers(0, 6),
    rank2=st.integers(0, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_sqrtm_route_matches_eigendecomposition(k, rank1, rank2, seed):
    rng = np.random.default_rng(seed)
    f1 = rng.normal(size=(k, min(rank1, k)))
    f2 = rng.normal(size=(k, min(rank2, k)))
    a, b = f1 @ f1.T, f2 @ f2.T
    mu = rng.normal(size=k)
    scale = 1 + np.trace(a) + np.trace(b)
    s = frechet_distance(mu, a, 0 * mu, b, method="sqrtm")
    e = frechet_distance(mu, a, 0 * mu, b, method="eig")
    assert s == pytest.approx(e, abs=1e-5 * scale)


def test_eig_route_is_trace_of_scipy_root_on_full_rank():
    rng = np.random.default_rng(4)
    f1, f2 = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    a, b = f1 @ f1.T, f2 @ f2.T
    expected = np.trace(np.real(scipy.linalg.sqrtm(a @ b)))
    assert trace_sqrt_product_eig(a, b) == pytest.approx(expected, rel=1e-8)


def _expected_stats(shares: np.ndarray):
    return shares.mean(0), np.cov(shares.T)


def test_planted_generator_and_source(tmp_path):
    """Means, FSD and noise floor match statistics computed from the known column counts."""
    n = 60
    gen, src, seg = StripeGenerator(), StripeSource(2 * n, seed=5), ColorSegmenter()
    ds = measure_fsd(gen, src, seg, n, batch_size=16, seed=7, progress=False)
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(7))
    g = true_shares(StripeGenerator.widths(z))
    r = true_shares(src.widths[:n])
    r2 = true_shares(src.widths[n:])
    np.testing.assert_allclose(ds["mean_generated"].values, g.mean(0), atol=1e-12)
    np.testing.assert_allclose(ds["mean_real"].values, r.mean(0), atol=1e-12)
    np.testing.assert_allclose(ds["cov_real"].values, np.cov(r.T), atol=1e-12)
    assert ds.attrs["fsd"] == pytest.approx(frechet_distance(*_expected_stats(g), *_expected_stats(r), method="eig"), rel=1e-6)  # fmt: skip
    assert ds.attrs["fsd_floor"] == pytest.approx(frechet_distance(*_expected_stats(r2), *_expected_stats(r), method="eig"), rel=1e-6, abs=1e-12)  # fmt: skip
    assert ds["dropped"].sel(concept="blue").item()
    assert not ds["dropped"].sel(concept="red").item()
    index = write_fsd_report(ds, tmp_path)
    assert "blue" in index.read_text() and (tmp_path / "img" / "fsd_frequency.png").stat().st_size
    back = load_dataset(tmp_path / "fsd.nc")
    assert back["dropped"].dtype == bool and back.attrs["fsd"] == ds.attrs["fsd"]


def test_cached_statistics_are_reused(tmp_path):
    gen, src, seg = StripeGenerator(), StripeSource(40, seed=5), ColorSegmenter()
    a = measure_fsd(gen, src, seg, 20, progress=False, cache_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 3
    b = measure_fsd(gen, src, seg, 20, progress=False, cache_dir=tmp_path)
    assert a.attrs["fsd"] == b.attrs["fsd"]
    c = measure_fsd(gen, src, seg, 20, seed=1, progress=False, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 4 and c.attrs["fsd"] != a.attrs["fsd"]


def test_mismatched_label_sets_name_the_classes():
    gen, src = StripeGenerator(), StripeSource(40)
    with pytest.raises(
        ValueError, match=r"only in generated \['purple'\].*only in real \['blue'\]"
    ):
        measure_fsd(gen, src, ColorSegmenter(), 20, progress=False,
                    generated_segmenter=ColorSegmenter(("red", "green", "purple")))  # fmt: skip


def test_too_few_real_images_is_an_error():
    with pytest.raises(ValueError, match="needs 2 \\* samples = 40"):
        measure_fsd(StripeGenerator(), StripeSource(30), ColorSegmenter(), 20, progress=False)


def test_cli_prints_fsd_beside_floor(tmp_path, monkeypatch, capsys):
    assert _cli(monkeypatch, ["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "FSD" in out and "noise floor" in out and "dropped classes: blue" in out
    assert (tmp_path / "index.html").is_file()


def test_sharded_statistics_merge_to_the_whole():
    """Shards segmented separately (e.g. on Dask workers) merge to the single-pass stats."""
    from nethook.fsd import real_batches, segment_statistics

    src, seg = StripeSource(50, seed=9), ColorSegmenter()
    whole = segment_statistics(seg, real_batches(src, list(range(50)), 50), [1, 2, 3])
    a = segment_statistics(seg, real_batches(src, list(range(0, 17)), 5), [1, 2, 3])
    b = segment_statistics(seg, real_batches(src, list(range(17, 50)), 8), [1, 2, 3])
    a.merge(b)
    torch.testing.assert_close(a.mean(), whole.mean())
    torch.testing.assert_close(a.covariance(), whole.covariance())
    np.testing.assert_allclose(whole.mean().numpy(), true_shares(src.widths).mean(0))


@pytest.fixture(scope="module")
def client():
    """A dask LocalCluster of 2 forked worker processes (fork: no fresh interpreters to start)."""
    pytest.importorskip("distributed")
    import dask
    from distributed import Client, LocalCluster

    with (
        dask.config.set({"distributed.worker.multiprocessing-method": "fork"}),
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                     dashboard_address=None, memory_limit="2GiB") as cluster,
        Client(cluster) as client,
    ):  # fmt: skip
        yield client


def test_dask_statistics_equal_local_exactly(client):
    """The same shards segmented on 2 Dask workers give bit-identical stats and FSD."""
    gen, src, seg = StripeGenerator(), StripeSource(60, seed=3), ColorSegmenter()
    local = measure_fsd(gen, src, seg, 30, batch_size=4, shard_samples=8, seed=2, progress=False)
    remote = measure_fsd(gen, src, seg, 30, batch_size=4, shard_samples=8, seed=2,
                         client=client, progress=False)  # fmt: skip
    for name in ("mean_generated", "mean_real", "cov_generated", "cov_real"):
        np.testing.assert_array_equal(remote[name].values, local[name].values)
    assert remote.attrs["fsd"] == local.attrs["fsd"]
    assert remote.attrs["fsd_floor"] == local.attrs["fsd_floor"]
    r = true_shares(src.widths[:30])
    np.testing.assert_allclose(local["cov_real"].values, np.cov(r.T), atol=1e-12)


def test_share_statistics_go_through_the_runner(monkeypatch):
    """Every batch of both sides passes through nethook.runner.run (traced `shares` output)."""
    import nethook.runner
    import nethook.scale

    calls = []
    real_run = nethook.runner.run

    def spy(model, source, consumers, **kw):
        calls.append((type(source).__name__, kw["start"], kw["samples"]))
        return real_run(model, source, consumers, **kw)

    monkeypatch.setattr(nethook.scale, "run", spy)
    measure_fsd(StripeGenerator(), StripeSource(40), ColorSegmenter(), 20, batch_size=5,
                shard_samples=10, progress=False)  # fmt: skip
    assert sorted(calls) == sorted(
        [("LatentSource", 0, 10), ("LatentSource", 10, 10), ("ImageItems", 0, 10),
         ("ImageItems", 10, 10), ("ImageItems", 20, 10), ("ImageItems", 30, 10)]
    )  # fmt: skip


def _cli(monkeypatch, argv):
    from nethook.commands import fsd as command

    monkeypatch.setattr("nethook.plugins.get_source", lambda spec: StripeSource(40, seed=1))
    monkeypatch.setattr("nethook.plugins.get_segmenter", lambda spec: ColorSegmenter())
    monkeypatch.setattr("nethook.models.load_model", lambda spec, weights=None: StripeGenerator())
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    args = parser.parse_args(["fsd", "--real", "x", "--segmenter", "y", "--samples", "20",
                              "--quiet", *argv])  # fmt: skip
    return args.func(args)


def test_cli_on_a_dask_scheduler_prints_the_local_figures(monkeypatch, capsys, client):
    assert _cli(monkeypatch, []) == 0
    local = capsys.readouterr().out
    assert _cli(monkeypatch, ["--scheduler", client.scheduler.address]) == 0
    assert capsys.readouterr().out == local


def test_cli_refuses_zero_dask_workers(monkeypatch, capsys):
    assert _cli(monkeypatch, ["--dask-workers", "0"]) == 2
    assert "--dask-workers must be >= 1, got 0" in capsys.readouterr().err
