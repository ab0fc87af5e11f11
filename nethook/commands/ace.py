"""``nethook ace``: find the units that cause a concept and measure their average causal effect.

::

    nethook ace --layer layer2 --concept tree --out DIR [--units 20] [--epochs 10]

Steps: a quick dissection for the concept's IoUs (the search's initial alpha), the
insertion constant k, the causal unit search (checkpointed per epoch to
``DIR/search.pt``; rerun to resume), the ACE of the top units and of the top-IoU
units, the ablation curve of both rankings (``DIR/ablation_curve.png``) and the
context test (``DIR/context.png``, ``DIR/context_bars.png``). Everything measured
goes to ``DIR/ace.json``; ``nethook intervene --ranking DIR/ace.json`` reuses it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nethook.commands.gandissect import add_model_options, load


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``ace`` subcommand."""
    parser = subparsers.add_parser(
        "ace",
        help="causal unit search and average causal effect of a concept in a generator",
        description=__doc__.split("::")[0].strip(),
    )
    add_model_options(parser)
    parser.add_argument("--concept", required=True, help="concept name, e.g. tree")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--units", type=int, default=20, help="number of causal units kept")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per epoch")
    parser.add_argument("--batch-size", type=int, default=16, help="z per search step")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--penalty", type=float, default=0.01, help="lambda of ||alpha||^2")
    parser.add_argument("--samples", type=int, default=200, help="z samples for ACE and curves")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-context", action="store_true", help="skip the context test")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the search and measurements; return the exit code."""
    from nethook import causal
    from nethook.gandissect import gandissect

    progress = not args.quiet
    out: Path = args.out
    try:
        generator, segmenter = load(args)
        causal.concept_id(segmenter, args.concept)
        ds = gandissect(
            generator, args.layer, segmenter, n=args.samples, concepts=[args.concept],
            gallery=0, seed=args.seed, progress=progress,
        )  # fmt: skip
        iou = ds["iou"].values[:, 0]
        k = causal.insertion_constant(
            generator, args.layer, segmenter, args.concept, n=args.samples, seed=args.seed
        )
        out.mkdir(parents=True, exist_ok=True)
        search = causal.search_causal_units(
            generator, args.layer, segmenter, args.concept, k, iou,
            epochs=args.epochs, steps_per_epoch=args.steps, batch_size=args.batch_size,
            lr=args.lr, penalty=args.penalty, seed=args.seed,
            checkpoint=out / "search.pt", progress=progress,
        )  # fmt: skip
    except (ValueError, LookupError) as exc:
        print(f"nethook ace: error: {exc}", file=sys.stderr)
        return 2
    n = min(args.units, len(iou))
    by_search = search.top(len(iou))
    by_iou = [int(u) for u in iou.argsort(kind="stable")[::-1]]
    effects = {
        name: causal.average_causal_effect(
            generator, args.layer, segmenter, args.concept, order[:n], k,
            n=args.samples, seed=args.seed + 1,
        ).to_json()
        for name, order in (("search", by_search), ("iou", by_iou))
    }  # fmt: skip
    counts = sorted({c for c in (1, 2, 4, 8, 12, 16, 20, n) if c <= n})
    curve = causal.ablation_curve(
        generator, args.layer, segmenter, args.concept,
        {"causal search": by_search, "IoU": by_iou}, counts,
        n=args.samples, seed=args.seed + 2, progress=progress,
    )  # fmt: skip
    causal.plot_ablation_curve(curve, out / "ablation_curve.png")
    result = {
        "concept": args.concept,
        "layer": args.layer,
        "model": args.model,
        "ranking": by_search,
        "top": by_search[:n],
        "alpha": [float(a) for a in search.alpha],
        "iou": [float(v) for v in iou],
        "iou_ranking": by_iou,
        "k": [float(v) for v in k],
        "effect": effects,
        "curve": {
            str(name): dict(
                zip(
                    map(int, curve["units"].values),
                    curve.sel(ranking=name).values.tolist(),
                    strict=True,
                )
            )
            for name in curve["ranking"].values
        },
        "history": search.history,
    }
    if not args.no_context:
        heat, table, images = causal.context_test(
            generator, args.layer, segmenter, args.concept, by_search[:n], k, seed=args.seed + 3
        )
        causal.plot_context(heat, table, images, out / "context.png", out / "context_bars.png")
        result["context"] = table.to_dict(orient="records")
    text = json.dumps(result, indent=1, default=float)
    tmp = out / ".ace.json.tmp"
    tmp.write_text(text)
    tmp.replace(out / "ace.json")
    for name, eff in effects.items():
        print(
            f"{name:>6}: top {n} units ACE {eff['ace']:.3f}, ablation removes "
            f"{eff['removed']:.1%} of {args.concept}"
        )
    print(f"top units by causal search: {by_search[:n]}")
    print(f"results: {out / 'ace.json'}")
    return 0
