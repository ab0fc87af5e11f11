"""``nethook fsd``: Fréchet Segmentation Distance of a generator against real images.

::

    nethook fsd --generator nethook.gan.generator:scene_gan \\
        --real scenes:n=20000,size=32,seed=1000 --segmenter scenes-seg --samples 10000 \\
        [--out DIR] [--category object] [--cache DIR] [--dask-workers N | --scheduler ADDR]

Prints the FSD beside its noise floor (two disjoint real samples of the same
size) and the classes the generator drops; with ``--out`` writes ``fsd.nc`` and
``index.html`` with the per-class frequency plot. ``--dask-workers N`` segments
the shards on a local Dask cluster of N worker processes, ``--scheduler`` on a
running cluster; the result is the same as in one process.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEFAULT_GENERATOR = "nethook.gan.generator:scene_gan"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``fsd`` subcommand."""
    parser = subparsers.add_parser(
        "fsd",
        help="Fréchet Segmentation Distance of a generator vs real images, with noise floor",
        description=__doc__.split("::")[0].strip(),
    )
    parser.add_argument("--generator", default=DEFAULT_GENERATOR, help="generator spec")
    parser.add_argument("--weights", help="weights file for the generator")
    parser.add_argument("--real", required=True, help="concept source spec of real images")
    parser.add_argument("--segmenter", required=True, help="segmenter spec, e.g. scenes-seg")
    parser.add_argument("--samples", type=int, default=10000, help="images per side")
    parser.add_argument("--category", default="object", help="label category (object)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated z")
    parser.add_argument("--out", type=Path, help="write fsd.nc and an HTML report here")
    parser.add_argument("--cache", type=Path, help="cache the statistics in this directory")
    parser.add_argument("--device", help="torch device (default: cpu)")
    dask = parser.add_mutually_exclusive_group()
    dask.add_argument("--dask-workers", type=int, help="run on a local Dask cluster of N workers")
    dask.add_argument("--scheduler", help="run on the Dask cluster at this scheduler address")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


@contextlib.contextmanager
def dask_client(args: argparse.Namespace) -> Iterator[Any]:
    """The Dask client ``args`` ask for (a local cluster, a scheduler address) or None."""
    if args.dask_workers is None and not args.scheduler:
        yield None
        return
    if args.dask_workers is not None and args.dask_workers < 1:
        raise ValueError(f"--dask-workers must be >= 1, got {args.dask_workers}")
    from distributed import Client, LocalCluster

    if args.scheduler:
        with Client(args.scheduler) as client:
            yield client
        return
    with (
        LocalCluster(n_workers=args.dask_workers, threads_per_worker=1,
                     dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):  # fmt: skip
        yield client


def run(args: argparse.Namespace) -> int:
    """Measure and print the FSD described by ``args``; return the exit code."""
    from nethook.fsd import format_fsd, measure_fsd, write_fsd_report
    from nethook.models import load_model
    from nethook.plugins import get_segmenter, get_source

    try:
        generator = load_model(args.generator, weights=args.weights).eval()
        if args.device:
            generator.to(args.device)
        with dask_client(args) as client:
            ds = measure_fsd(
                generator,
                get_source(args.real),
                get_segmenter(args.segmenter),
                args.samples,
                category=args.category,
                batch_size=args.batch_size,
                seed=args.seed,
                cache_dir=args.cache,
                client=client,
                progress=not args.quiet,
            )
    except (ValueError, LookupError, FileNotFoundError) as exc:
        print(f"nethook fsd: error: {exc}", file=sys.stderr)
        return 2
    ds.attrs.update(
        generator_spec=args.generator, real_source=args.real, segmenter_spec=args.segmenter
    )
    print(format_fsd(ds))
    dropped = [str(c) for c in ds["concept"].values[ds["dropped"].values]]
    print(f"dropped classes: {', '.join(dropped) or 'none'}")
    if args.out:
        print(f"report: {write_fsd_report(ds, args.out)}", file=sys.stderr)
    return 0
