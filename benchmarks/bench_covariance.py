"""Covariance throughput and accuracy against the float32 matmul ceiling.

Side by side in one run, float32, C = 512, batches of 8192 rows:

- samples/s of ``Covariance.update`` against one float32 ``X.T @ X`` per batch (the
  ceiling: the least work any covariance must do), interleaved and repeated, with
  the median ratio; also the bare centred floor (centre, sum, ``X.T @ X``), the
  least a centred, offset-proof method must do;
- relative (Frobenius) error of the covariance at mean offsets 0, 1e3 and 1e4 for a
  naive float32 ``E[xx^T] - mu mu^T``, for ``Covariance()`` and for
  ``Covariance(dtype=torch.float64)``, against numpy float64.

Run: ``.venv/bin/python benchmarks/bench_covariance.py [--batches 8] [--repeats 5]
[--threads N]``. On a shared machine the ratio is the figure to read; ``--threads 1``
makes it less sensitive to other processes competing for the cores.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from nethook.stats.moments import Covariance

CHANNELS = 512
BATCH = 8192


def make_data(batches: int, offset: float, seed: int = 0) -> torch.Tensor:
    """Correlated float32 data ``[batches * BATCH, CHANNELS]`` with a drifting mean."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(CHANNELS, CHANNELS, generator=g) / CHANNELS**0.5
    x = torch.randn(batches * BATCH, CHANNELS, generator=g) @ mix
    drift = torch.linspace(0, 1, x.shape[0]).unsqueeze(1) * torch.randn(CHANNELS, generator=g)
    return (x + drift + offset).float()


def ceiling(batches: list[torch.Tensor]) -> None:
    """One float32 ``X.T @ X`` per batch, nothing else."""
    for b in batches:
        b.T @ b


def centred_floor(batches: list[torch.Tensor]) -> None:
    """The least a centred float32 covariance does: centre, sum, ``X.T @ X`` per batch."""
    for b in batches:
        d = b - b.mean(0)
        d.sum(0)
        d.T @ d


def ours(batches: list[torch.Tensor], dtype: torch.dtype | None = None) -> Covariance:
    """Stream the batches through a :class:`Covariance`."""
    stat = Covariance(dtype=dtype)
    for b in batches:
        stat.update(b)
    return stat


def naive(x: torch.Tensor) -> np.ndarray:
    """Uncentred float32 covariance, as written in many codebases."""
    n = x.shape[0]
    mean = x.mean(0)
    cov = (x.T @ x / n - torch.outer(mean, mean)) * (n / (n - 1))
    return cov.double().numpy()


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    """Frobenius-norm relative error."""
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


def timed(fn, *args) -> float:
    """Seconds one call of ``fn`` takes."""
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    """Print throughput ratios and the accuracy table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=8, help="batches of 8192 rows per pass")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing repeats")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("highest")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, C={CHANNELS}, batch={BATCH}"
    )

    data = list(make_data(args.batches, 0.0).split(BATCH))
    ceiling(data[:1])
    ours(data[:1])
    t_ceiling, t_floor, t_ours, t_ours64 = [], [], [], []
    for _ in range(args.repeats):
        t_ceiling.append(timed(ceiling, data))
        t_floor.append(timed(centred_floor, data))
        t_ours.append(timed(ours, data))
        t_ours64.append(timed(ours, data, torch.float64))
    rows = args.batches * BATCH
    ratios = [c / o for c, o in zip(t_ceiling, t_ours, strict=True)]
    print("\nthroughput (median of interleaved repeats)")
    print(f"  float32 X.T@X ceiling : {rows / statistics.median(t_ceiling) / 1e3:8.1f} K samples/s")
    print(f"  centre+sum+X.T@X floor: {rows / statistics.median(t_floor) / 1e3:8.1f} K samples/s")
    print(f"  Covariance()          : {rows / statistics.median(t_ours) / 1e3:8.1f} K samples/s")
    print(f"  Covariance(float64)   : {rows / statistics.median(t_ours64) / 1e3:8.1f} K samples/s")
    floor = [c / f for c, f in zip(t_ceiling, t_floor, strict=True)]
    print(
        f"  ratio ours/ceiling    : median {statistics.median(ratios):.2f} "
        f"(range {min(ratios):.2f}-{max(ratios):.2f}); floor/ceiling "
        f"{statistics.median(floor):.2f}"
    )

    print("\nrelative error of the covariance vs numpy float64 (drifting mean)")
    print(f"  {'offset':>8} {'naive f32':>12} {'ours f32':>12} {'ours f64':>12}")
    for offset in (0.0, 1e3, 1e4):
        x = make_data(args.batches, offset, seed=1)
        ref = np.cov(x.double().numpy(), rowvar=False)
        batches = list(x.split(BATCH))
        err32 = rel_err(ours(batches).covariance().numpy(), ref)
        err64 = rel_err(ours(batches, torch.float64).covariance().numpy(), ref)
        print(f"  {offset:>8g} {rel_err(naive(x), ref):>12.2e} {err32:>12.2e} {err64:>12.2e}")


if __name__ == "__main__":
    main()
