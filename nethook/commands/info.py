"""``nethook info PATH.zarr``: what an activation store holds and how complete it is."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``info`` subcommand."""
    parser = subparsers.add_parser(
        "info",
        help="what an activation store holds and how complete it is",
        description="Print a store's provenance, layers, dims and completeness.",
    )
    parser.add_argument("path", help="store path (directory or fsspec URL)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument(
        "--verify", action="store_true", help="also check every block against its checksum"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the summary; exit 1 if the store cannot be read or (with --verify) is corrupt."""
    from nethook.store import ActivationStore, StoreError

    try:
        store = ActivationStore.open(args.path)
        info = store.summary()
        problems = [str(p) for p in store.verify()] if args.verify else None
    except (StoreError, ValueError) as exc:
        print(f"nethook info: {exc}", file=sys.stderr)
        return 1
    if problems is not None:
        info["corrupt"] = problems
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(format_summary(info))
    return 1 if problems else 0


def format_summary(info: dict) -> str:
    """Human-readable text of :meth:`ActivationStore.summary`."""
    pct = 100.0 * info["complete_samples"] / max(info["samples"], 1)
    lines = [
        f"store   {info['path']}",
        f"model   {info['model']}  (weights {info['model_hash'] or 'unhashed'})",
        f"source  {info['source']}  (fingerprint {info['source_fingerprint'] or '-'})",
        f"seed    {info['seed']}   dtype {info['dtype']}   nethook {info['nethook_version']}",
        f"samples {info['complete_samples']}/{info['samples']} complete ({pct:.1f}%), "
        f"{info['complete_blocks']}/{info['blocks']} blocks of {info['block_samples']}",
    ]
    if info["missing_ranges"]:
        gaps = ", ".join(f"{a}..{b - 1}" for a, b in info["missing_ranges"])
        lines.append(f"missing samples {gaps}  (rerun the record command to finish)")
    lines.append("layers")
    for name, layer in info["layers"].items():
        dims = ", ".join(f"{d}={n}" for d, n in layer["dims"].items())
        lines.append(f"  {name:<24} ({dims})  {layer['bytes'] / 2**20:.1f} MiB")
    for problem in info.get("corrupt") or []:
        lines.append(f"CORRUPT {problem}")
    return "\n".join(lines)
