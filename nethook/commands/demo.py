"""``nethook demo``: dissect the shipped demo CNN on procedural scenes, offline.

Runs Network Dissection on every conv block of the demo scene classifier
(``nethook.demo.scene_cnn``) over images of the ``scenes`` plugin, writes the HTML
report to ``--out`` (default ``nethook-demo/``) and prints a per-layer summary:
units, detectors and unique concepts by category. No network, a few minutes on
two CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from nethook.commands.dissect import parse_alphas, summary_text

DEMO_MODEL = "nethook.demo.scene_cnn:scene_cnn"
DEMO_LAYERS = ("block1", "block2", "block3", "block4")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand."""
    parser = subparsers.add_parser(
        "demo",
        help="dissect the demo scene CNN on procedural scenes and write a report",
        description=__doc__.split("\n\n")[1],
    )
    parser.add_argument("--out", type=Path, default=Path("nethook-demo"), help="output directory")
    parser.add_argument("--images", type=int, default=1000, help="number of procedural scenes")
    parser.add_argument("--size", type=int, default=64, help="image size in pixels")
    parser.add_argument("--rotate", type=float, help="dissect in a random basis Q**ALPHA")
    parser.add_argument(
        "--rotate-sweep",
        type=parse_alphas,
        default=[0.0, 0.5, 1.0],
        help="unique detectors at these rotation alphas, plotted in the report (default 0,0.5,1)",
    )
    parser.add_argument("--sweep-samples", type=int, default=200, help="images per alpha")
    parser.add_argument("--no-sweep", action="store_true", help="skip the rotation sweep")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run, seed=0)


def run(args: argparse.Namespace) -> int:
    """Dissect the demo model, write the report and print the summary."""
    from nethook.commands.dissect import sweep
    from nethook.dissect import dissect
    from nethook.report import write_report

    start = time.time()
    quiet = ",progress=false" if args.quiet else ""
    source = f"scenes:n={args.images},size={args.size},seed=12345{quiet}"
    results = dissect(
        DEMO_MODEL,
        list(DEMO_LAYERS),
        source,
        out=args.out,
        batch_size=args.batch_size,
        rotate=args.rotate,
        progress=not args.quiet,
    )
    if args.no_sweep:
        args.rotate_sweep = None
    rotation = sweep(args, DEMO_MODEL, list(DEMO_LAYERS), source)
    index = write_report(
        results,
        args.out,
        title="nethook demo: dissection of a scene CNN",
        rotation=rotation,
        progress=not args.quiet,
    )
    print(summary_text(results))
    print(f"\nreport: {index.resolve()}  ({time.time() - start:.0f} s)", file=sys.stderr)
    return 0
