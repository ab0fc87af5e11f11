"""``nethook intervene``: before/after image grids for ablating or inserting concept units.

::

    nethook intervene --layer layer2 --ablate tree:20 --out images/ \\
        [--insert tree:20 --at 3,4] [--ranking DIR/ace.json] [--samples 8]

``CONCEPT:N`` takes the first N units of the concept's ranking: the causal search
of ``nethook ace`` when ``--ranking`` names its ``ace.json`` for that concept, else
the units' IoU with the concept (a quick dissection of 200 samples). Ablation sets
them to 0 everywhere; insertion sets them to the concept's insertion constant in
the feature cell ``--at Y,X`` (default: the centre cell). Writes one PNG per
intervention: the original images on top, the edited ones below.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nethook.commands.gandissect import add_model_options, load


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``intervene`` subcommand."""
    parser = subparsers.add_parser(
        "intervene",
        help="ablate/insert the units of a concept in a generator and save before/after grids",
        description=__doc__.split("::")[0].strip(),
    )
    add_model_options(parser)
    parser.add_argument("--ablate", action="append", default=[], help="CONCEPT:N (repeatable)")
    parser.add_argument("--insert", action="append", default=[], help="CONCEPT:N (repeatable)")
    parser.add_argument("--at", help="feature cell Y,X for insertions (default: centre)")
    parser.add_argument("--ranking", type=Path, help="ace.json written by nethook ace")
    parser.add_argument("--samples", type=int, default=8, help="images per grid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.set_defaults(func=run)


def parse_request(text: str) -> tuple[str, int]:
    """``"tree:20"`` -> ``("tree", 20)``."""
    name, sep, count = text.rpartition(":")
    if not sep or not name or not count.isdigit() or int(count) < 1:
        raise ValueError(f"{text!r}: expected CONCEPT:N, e.g. tree:20")
    return name, int(count)


def ranking_for(args, generator, segmenter, concept: str) -> tuple[list[int], str]:
    """Units for ``concept``, best first, and where the ranking came from."""
    from nethook.gandissect import gandissect

    if args.ranking:
        data = json.loads(Path(args.ranking).read_text())
        if data.get("concept") == concept:
            return [int(u) for u in data["ranking"]], f"causal search ({args.ranking})"
    ds = gandissect(
        generator, args.layer, segmenter, n=200, concepts=[concept], gallery=0, progress=False
    )
    iou = ds["iou"].values[:, 0]
    return [int(u) for u in iou.argsort()[::-1]], "IoU (200 samples)"


def run(args: argparse.Namespace) -> int:
    """Write the requested before/after grids; return the exit code."""
    import torch

    from nethook.causal import insertion_constant, save_grid
    from nethook.gandissect import generate, sample_z
    from nethook.interventions import Ablate, Replace

    try:
        requests = [("ablate", *parse_request(t)) for t in args.ablate]
        requests += [("insert", *parse_request(t)) for t in args.insert]
        if not requests:
            raise ValueError("nothing to do: give --ablate CONCEPT:N and/or --insert CONCEPT:N")
        generator, segmenter = load(args)
        z = sample_z(generator, args.samples, args.seed)
        base = generate(generator, args.layer, z)
        h, w = base.features.shape[-2:]
        y, x = (h // 2, w // 2) if not args.at else (int(v) for v in args.at.split(","))
        if not (0 <= y < h and 0 <= x < w):
            raise ValueError(f"--at {args.at}: outside the {h} x {w} feature map")
        for kind, concept, count in requests:
            units, source = ranking_for(args, generator, segmenter, concept)
            units = units[:count]
            if kind == "ablate":
                edit = Ablate(units=units)
            else:
                k = insertion_constant(generator, args.layer, segmenter, concept)
                cell = torch.zeros(h, w)
                cell[y, x] = 1
                edit = Replace(units=units, values=k[units].tolist(), mask=cell)
            after = generate(generator, args.layer, z, edit=edit).images
            path = save_grid(base.images, after, args.out / f"{kind}_{concept}_{count}.png")
            print(f"{kind} {concept} units {units} (ranked by {source}): {path}")
    except (ValueError, LookupError, OSError) as exc:
        print(f"nethook intervene: error: {exc}", file=sys.stderr)
        return 2
    return 0
