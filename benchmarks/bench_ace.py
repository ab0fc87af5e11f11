"""Benchmark: wall time of ``nethook ace`` and of each of its phases.

    .venv/bin/python benchmarks/bench_ace.py [--concept grass] [--epochs 4 --steps 5 ...]

Runs the ``ace`` command (defaults: the model card's settings, ``--layer layer2
--concept grass --epochs 4 --steps 5 --batch-size 8 --samples 100``) with each
phase timed: the quick dissection for the IoU initialization, the insertion
constant, the causal unit search, the two ACE measurements, the ablation curve
and the context test. Prints seconds and shares of the total, so what dominates
is plain, then the ablation curve of both rankings (thesis figure 4-4's
comparison). Outputs go to a temporary directory.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from nethook import causal, gandissect
from nethook.commands import ace

PHASES = {
    "dissection (IoU init)": (gandissect, "gandissect"),
    "insertion constant": (causal, "insertion_constant"),
    "causal search": (causal, "search_causal_units"),
    "ACE (search, IoU units)": (causal, "average_causal_effect"),
    "ablation curve": (causal, "ablation_curve"),
    "context test": (causal, "context_test"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", default="layer2")
    parser.add_argument("--concept", default="grass")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--samples", type=int, default=100)
    args = parser.parse_args()
    spent: dict[str, float] = defaultdict(float)

    def timed(name, fn):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[name] += time.perf_counter() - t

        return wrapper

    for name, (module, attr) in PHASES.items():
        setattr(module, attr, timed(name, getattr(module, attr)))
    sub = argparse.ArgumentParser().add_subparsers()
    ace.register(sub)
    with tempfile.TemporaryDirectory() as out:
        argv = [
            "ace", "--layer", args.layer, "--concept", args.concept, "--epochs", str(args.epochs),
            "--steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--samples", str(args.samples), "--out", out, "--quiet",
        ]  # fmt: skip
        parsed = sub.choices["ace"].parse_args(argv[1:])
        t = time.perf_counter()
        code = parsed.func(parsed)
        total = time.perf_counter() - t
        if code != 0:
            raise SystemExit(f"nethook ace exited with {code}")
        result = json.loads((Path(out) / "ace.json").read_text())
    print(f"nethook {' '.join(argv[:-3])}: {total:.1f} s wall")
    for name in PHASES:
        print(f"  {name:<26} {spent[name]:7.1f} s  {spent[name] / total:6.1%}")
    other = total - sum(spent.values())
    print(f"  {'other (plots, json)':<26} {other:7.1f} s  {other / total:6.1%}")
    print(f"share of {args.concept} removed by ablating the first m units of each ranking:")
    for name, curve in result["curve"].items():
        print(f"  {name:<14} " + "  ".join(f"{m}: {v:.2f}" for m, v in curve.items()))


if __name__ == "__main__":
    main()
