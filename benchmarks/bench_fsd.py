"""Benchmark: FSD against the bare passes it needs, and its Dask path against the local one.

    .venv/bin/python benchmarks/bench_fsd.py [--samples 200] [--batch 50] [--repeats 3]
        [--dask-workers 2] [--threads 1]

1. ``measure_fsd`` of the demo generator (``scene_gan``) on ``samples``
   generated and ``2 x samples`` real procedural scenes, against the bare passes
   it needs (generating ``samples`` images, segmenting them and the
   ``2 x samples`` real ones, nothing else); the ratio is the overhead of the
   runner, the share vectors, the Covariance stats and the distance. Side by
   side in one process, alternating order, best of ``--repeats``.
2. The same measurement on a local Dask cluster of ``--dask-workers`` forked
   worker processes: its figures must equal the local ones bit for bit; the
   time ratio says what the cluster costs or saves on this machine.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from nethook.fsd import format_fsd, generated_batches, measure_fsd, real_batches


def bare(generator, source, segmenter, n: int, batch: int) -> None:
    """The generator and segmenter passes FSD needs, and nothing else."""
    with torch.no_grad():
        for images in generated_batches(generator, n, batch, seed=0):
            segmenter.segment(images)
        for images in real_batches(source, list(range(2 * n)), batch):
            segmenter.segment(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dask-workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from nethook_plugins.scenes import Scenes
    from nethook_plugins.scenes_segmenter import ScenesSegmenter

    from nethook.gan.generator import scene_gan

    generator = scene_gan()
    segmenter = ScenesSegmenter(parts=False)
    source = Scenes(n=2 * args.samples, size=32, seed=1000)
    for i in range(len(source)):  # render once, outside the timings
        source[i]

    def fsd(client=None):
        return measure_fsd(generator, source, segmenter, args.samples, batch_size=args.batch,
                           client=client, progress=False)  # fmt: skip

    times: dict[str, list[float]] = {"bare": [], "fsd": []}
    local = None
    for r in range(args.repeats):
        for name in ("bare", "fsd") if r % 2 == 0 else ("fsd", "bare"):
            start = time.perf_counter()
            if name == "bare":
                bare(generator, source, segmenter, args.samples, args.batch)
            else:
                local = fsd()
            times[name].append(time.perf_counter() - start)
    b, f = min(times["bare"]), min(times["fsd"])
    print(f"FSD, {args.samples} generated + {2 * args.samples} real images, demo generator "
          f"(best of {args.repeats}, {args.threads} thread)")  # fmt: skip
    print(f"  bare generator + segmenter passes: {b:.2f} s")
    print(f"  measure_fsd (runner, local):       {f:.2f} s   ratio {f / b:.2f}x")
    print(f"  {format_fsd(local)}")
    dropped = [str(c) for c in local["concept"].values[local["dropped"].values]]
    print(f"  dropped classes: {', '.join(dropped) or 'none'}")

    import dask
    from distributed import Client, LocalCluster

    with (
        dask.config.set({"distributed.worker.multiprocessing-method": "fork"}),
        LocalCluster(n_workers=args.dask_workers, threads_per_worker=1,
                     dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):  # fmt: skip
        fsd(client)  # warm the workers (first task imports and unpickles the models)
        start = time.perf_counter()
        remote = fsd(client)
        d = time.perf_counter() - start
    same = all(
        np.array_equal(remote[v].values, local[v].values)
        for v in ("mean_generated", "mean_real", "cov_generated", "cov_real")
    ) and (remote.attrs["fsd"], remote.attrs["fsd_floor"]) == (
        local.attrs["fsd"], local.attrs["fsd_floor"],
    )  # fmt: skip
    print(f"  on a Dask LocalCluster, {args.dask_workers} worker processes: {d:.2f} s   "
          f"ratio to local {d / f:.2f}x   identical to local: {same}")  # fmt: skip


if __name__ == "__main__":
    main()
