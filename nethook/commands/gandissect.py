"""``nethook gandissect``: label the units of a generator layer with the concepts they draw.

::

    nethook gandissect --model nethook.gan.generator:scene_gan --layer layer2 \\
        --segmenter scenes-seg --out DIR [--samples 1000] [--concepts tree,sky]

Thresholds per (unit, concept) maximize I/H on one sample of z; IoUs and galleries
come from another. Writes ``DIR/results.zarr``, ``results.json``, ``results.csv``
and the HTML report ``DIR/index.html``, then prints the per-layer summary.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_MODEL = "nethook.gan.generator:scene_gan"
DEFAULT_SEGMENTER = "scenes-seg"


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--weights``, ``--layer``, ``--segmenter``, ``--device``, ``--quiet``."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"generator spec ({DEFAULT_MODEL})")
    parser.add_argument("--weights", help="weights file for the generator")
    parser.add_argument("--layer", required=True, help="layer of the generator, e.g. layer2")
    parser.add_argument(
        "--segmenter", default=DEFAULT_SEGMENTER, help=f"segmenter spec ({DEFAULT_SEGMENTER})"
    )
    parser.add_argument("--device", help="torch device (default: cpu)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``gandissect`` subcommand."""
    parser = subparsers.add_parser(
        "gandissect",
        help="dissect a generator layer (IoU with segmented concepts) and write an HTML report",
        description=__doc__.split("::")[0].strip(),
    )
    add_model_options(parser)
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--samples", type=int, default=1000, help="z samples per pass")
    parser.add_argument("--seed", type=int, default=0, help="seed of the threshold sample")
    parser.add_argument("--concepts", help="comma-separated concept names (default: all)")
    parser.add_argument("--min-iou", type=float, default=0.05, help="detector IoU cut-off")
    parser.add_argument("--gallery", type=int, default=8, help="top images per unit")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--no-report", action="store_true", help="skip the HTML report")
    parser.set_defaults(func=run)


def load(args: argparse.Namespace):
    """The generator and segmenter named by ``args`` (on ``args.device``)."""
    from nethook.models import load_model
    from nethook.plugins import get_segmenter

    generator = load_model(args.model, weights=args.weights).eval()
    if args.device:
        generator.to(args.device)
    return generator, get_segmenter(args.segmenter)


def run(args: argparse.Namespace) -> int:
    """Run the dissection described by ``args``; return the exit code."""
    from nethook.commands.dissect import summary_text
    from nethook.dissect import save_results
    from nethook.gandissect import gandissect
    from nethook.report import write_report

    concepts = [c.strip() for c in (args.concepts or "").split(",") if c.strip()] or None
    try:
        generator, segmenter = load(args)
        ds = gandissect(
            generator,
            args.layer,
            segmenter,
            n=args.samples,
            seed=args.seed,
            concepts=concepts,
            batch_size=args.batch_size,
            min_iou=args.min_iou,
            gallery=args.gallery,
            progress=not args.quiet,
        )
    except (ValueError, LookupError) as exc:
        print(f"nethook gandissect: error: {exc}", file=sys.stderr)
        return 2
    ds.attrs["model"] = args.model
    results = {ds.attrs["layer"]: ds}
    save_results(results, args.out)
    if not args.no_report:
        index = write_report(
            results, args.out, title=f"GAN dissection of {args.model}", progress=not args.quiet
        )
        print(f"report: {index}", file=sys.stderr)
    print(summary_text(results))
    return 0
