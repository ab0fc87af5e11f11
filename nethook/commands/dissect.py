"""``nethook dissect``: label every unit of some layers with concepts (Network Dissection).

::

    nethook dissect --model torchvision:resnet18 --weights FILE --layers layer3,layer4 \\
        --source broden:DIR --out DIR [--quantile 0.005] [--min-iou 0.04] [--rotate ALPHA]

Writes ``DIR/results.zarr``, ``results.json``, ``results.csv`` and the HTML report
``DIR/index.html``, then prints a per-layer summary. Rerunning a killed command
with the same arguments resumes from its checkpoints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import xarray as xr


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``dissect`` subcommand."""
    parser = subparsers.add_parser(
        "dissect",
        help="label units with concepts (Network Dissection) and write an HTML report",
        description=__doc__.split("::")[0].strip(),
    )
    parser.add_argument("--model", required=True, help="model spec, e.g. torchvision:resnet18")
    parser.add_argument("--weights", help="weights file for the model")
    parser.add_argument("--layers", required=True, help="comma-separated layer names or globs")
    parser.add_argument(
        "--source", required=True, help="concept source spec, e.g. broden:DIR or scenes:n=2000"
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    add_options(parser)
    parser.set_defaults(func=run)


def add_options(parser: argparse.ArgumentParser) -> None:
    """Options shared with ``nethook demo``."""
    parser.add_argument(
        "--quantile", type=float, default=0.005, help="top share that a unit's mask keeps"
    )
    parser.add_argument(
        "--min-iou", type=float, default=0.04, help="IoU above which a unit is a detector"
    )
    parser.add_argument("--rotate", type=float, help="dissect in a random basis Q**ALPHA")
    parser.add_argument(
        "--rotate-sweep",
        type=parse_alphas,
        help="also count unique detectors at these alphas (e.g. 0,0.5,1) and plot them",
    )
    parser.add_argument(
        "--sweep-samples", type=int, default=200, help="images per alpha in --rotate-sweep"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the rotation and sketches")
    parser.add_argument("--samples", type=int, help="use only the first N images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--topk", type=int, default=5, help="gallery images per unit")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument(
        "--parallel",
        type=int,
        help="processes that share each pass on CPU (default: one per core, at most 8)",
    )
    parser.add_argument(
        "--pass2",
        choices=["store", "recompute"],
        default="store",
        help="pass 2 reads the activations pass 1 kept (default), or runs the model again",
    )
    parser.add_argument("--device", help="torch device (default: the model's)")
    parser.add_argument("--no-report", action="store_true", help="skip the HTML report")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def parse_alphas(text: str) -> list[float]:
    """``"0,0.5,1"`` -> ``[0.0, 0.5, 1.0]``, each in [0, 1]."""
    try:
        alphas = [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not alphas or any(not 0 <= a <= 1 for a in alphas):
        raise argparse.ArgumentTypeError(f"alphas must lie in [0, 1], got {text!r}")
    return alphas


def sweep(args: argparse.Namespace, model: str, layers: list[str], source: str, weights=None):
    """The rotation sweep ``--rotate-sweep`` asks for, or None."""
    if not args.rotate_sweep:
        return None
    from nethook.dissect import rotation_sweep

    return rotation_sweep(
        model,
        layers,
        source,
        args.rotate_sweep,
        weights=weights,
        samples=args.sweep_samples,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=not args.quiet,
    )


def summary_text(results: dict[str, xr.Dataset]) -> str:
    """The per-layer summary table printed at the end (units, detectors, unique by category)."""
    from nethook.dissect import summary_table

    table: pd.DataFrame = summary_table(results)
    return table.to_string(index=False)


def run(args: argparse.Namespace) -> int:
    """Run the dissection described by ``args``; return the exit code."""
    from nethook.dissect import dissect
    from nethook.report import write_report

    layers = [name.strip() for name in args.layers.split(",") if name.strip()]
    results = dissect(
        args.model,
        layers,
        args.source,
        out=args.out,
        weights=args.weights,
        quantile=args.quantile,
        min_iou=args.min_iou,
        batch_size=args.batch_size,
        samples=args.samples,
        topk=args.topk,
        rotate=args.rotate,
        seed=args.seed,
        device=args.device,
        num_workers=args.workers,
        parallel=args.parallel,
        pass2=args.pass2,
        progress=not args.quiet,
    )
    rotation = sweep(args, args.model, layers, args.source, args.weights)
    if rotation is not None:
        rotation.to_csv(args.out / "rotation.csv", index=False)
    if not args.no_report:
        index = write_report(
            results,
            args.out,
            title=f"Dissection of {args.model}",
            rotation=rotation,
            progress=not args.quiet,
        )
        print(f"report: {index}", file=sys.stderr)
    print(summary_text(results))
    return 0
