"""What this distribution adds to nethook: one function per hook it implements."""

from __future__ import annotations

import argparse

from nethook.plugins import hookimpl, parse_kwargs
from nethook_example.clamp import Clamp
from nethook_example.stripes import StripesSource


@hookimpl
def nethook_concept_sources() -> dict:
    """``stripes:n=16,size=32,period=8,seed=0`` -> a StripesSource."""
    return {"stripes": lambda arg: StripesSource(**parse_kwargs(arg))}


@hookimpl
def nethook_interventions() -> dict:
    """``clamp:high=0[,low=-1][,units=[3,7]]`` -> a Clamp intervention."""
    return {"clamp": lambda arg: Clamp(**parse_kwargs(arg))}


@hookimpl
def nethook_add_commands(subparsers: argparse._SubParsersAction) -> None:
    """``nethook stripes``: print the stripes source's concept table."""
    parser = subparsers.add_parser("stripes", help="show the example stripes concept source")
    parser.add_argument("--n", type=int, default=8, help="number of images")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=summarize)


def summarize(args: argparse.Namespace) -> int:
    """Print the concept table of ``StripesSource(n, size, seed)``."""
    source = StripesSource(n=args.n, size=args.size, seed=args.seed)
    print(f"stripes: {len(source)} images of {args.size}x{args.size}")
    print(source.concepts().to_string(index=False))
    return 0
