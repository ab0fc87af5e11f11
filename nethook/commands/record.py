"""``nethook record``: record layer activations over a source into a Zarr store.

Rerunning the same command resumes: only blocks not yet complete are computed. A store
recorded from another model, layer set or source is refused with the fields that differ.
"""

from __future__ import annotations

import argparse
import sys

DTYPES = ("float32", "float16", "bfloat16")  # nethook.store.DTYPES, without importing zarr


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``record`` subcommand."""
    parser = subparsers.add_parser(
        "record",
        help="record layer activations over a source into a resumable Zarr store",
        description=(
            "Run MODEL over SOURCE and store the activations of LAYERS in a Zarr v3 store "
            "(one array per layer, dims sample, unit, y, x). Rerunning the same command "
            "resumes where a killed run stopped; the result is the same bytes."
        ),
    )
    parser.add_argument("--model", required=True, help="model spec, e.g. torchvision:resnet18")
    parser.add_argument("--weights", help="weights file for the model (never downloaded)")
    parser.add_argument(
        "--layers", required=True, help="comma-separated layer names or globs, e.g. layer3,layer4"
    )
    parser.add_argument("--source", required=True, help="concept source spec, e.g. scenes:n=200")
    parser.add_argument("--out", required=True, help="store path (a directory or fsspec URL)")
    parser.add_argument("--samples", type=int, help="record only the first N samples")
    parser.add_argument("--start", type=int, default=0, help="first sample (default 0)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="storage dtype")
    parser.add_argument(
        "--block-samples",
        type=int,
        help="samples per block (default: ~64 MiB of the largest layer)",
    )
    parser.add_argument(
        "--chunk-samples", type=int, help="samples per chunk; smaller than a block = sharded"
    )
    parser.add_argument("--compressor", choices=("zstd", "blosc"), help="compress chunks")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--device", help="torch device (default: where the model is)")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed recorded with the store; also draws the random weights of a model "
        "given without --weights, so reruns build the same model (default 0)",
    )
    parser.add_argument(
        "--scheduler", help="dask scheduler address: record shards on that cluster instead"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Record (or resume) the store; print where it stands."""
    from nethook.scale import record
    from nethook.store import StoreError, StoreMismatchError

    layers = [name.strip() for name in args.layers.split(",") if name.strip()]
    if not layers:
        print(f"--layers {args.layers!r} names no layer", file=sys.stderr)
        return 2
    try:
        store = record(
            args.model,
            args.source,
            layers,
            args.out,
            client=args.scheduler,
            samples=args.samples,
            start=args.start,
            batch_size=args.batch_size,
            dtype=args.dtype,
            weights=args.weights,
            seed=args.seed,
            block_samples=args.block_samples,
            chunk_samples=args.chunk_samples,
            compressor=args.compressor,
            num_workers=args.workers,
            device=args.device,
            progress=not args.quiet,
        )
    except StoreMismatchError as exc:
        print(f"nethook record: {exc}", file=sys.stderr)
        return 3
    except (StoreError, ValueError, KeyError, LookupError) as exc:
        print(f"nethook record: {exc}", file=sys.stderr)
        return 1
    info = store.summary()
    print(
        f"{store.path}: {', '.join(store.layers)}; {info['complete_samples']}/{info['samples']} "
        f"samples in {info['complete_blocks']}/{info['blocks']} blocks, {store.dtype}"
    )
    return 0
