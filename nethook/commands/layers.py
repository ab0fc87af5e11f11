"""``nethook layers SPEC``: every module path with its type, parameter count and output shape.

The shapes come from one dry run on a zero input of ``--input-shape`` under
``torch.no_grad()``. Modules the forward pass never calls show ``-``; modules called
several times show their last output and the number of calls. If the dry run fails,
the table still shows what ran before the failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch
from torch import nn

from nethook.layers import layer_names
from nethook.models import load_model
from nethook.trace import TraceDict, describe

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "long": torch.long,
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``layers`` subcommand."""
    parser = subparsers.add_parser(
        "layers",
        help="list every module path with type, parameter count and output shape",
        description=(
            "Build the model SPEC (torchvision:resnet18, package.module:factory, "
            "path/to/file.py:factory), run it once on a zero input and print every "
            "module path with its type, parameter count and output shape. The paths "
            "are the layer names Trace, TraceDict and every other command accept."
        ),
    )
    parser.add_argument("spec", help="model spec, e.g. torchvision:resnet18")
    parser.add_argument(
        "--input-shape",
        type=parse_shape,
        default=(1, 3, 224, 224),
        help="shape of the zero input for the dry run (default 1,3,224,224)",
    )
    parser.add_argument(
        "--input-dtype",
        choices=sorted(DTYPES),
        default="float32",
        help="dtype of the dry-run input (long for token-id models; default float32)",
    )
    parser.add_argument("--weights", help="weights file to load (torch.load, weights_only)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` -> ``(1, 3, 224, 224)``; an argparse type with a clear error."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"input shape must be comma-separated positive integers like 1,3,224,224, got {text!r}"
        ) from None
    if not shape or any(n <= 0 for n in shape):
        raise argparse.ArgumentTypeError(f"input shape must be positive integers, got {text!r}")
    return shape


def layer_table(model: nn.Module, example: Any) -> tuple[list[dict[str, Any]], Exception | None]:
    """One row per module (path, type, params, output, calls) from one forward on ``example``.

    Returns the rows and the exception the forward pass raised, if any (rows then
    show the modules that ran before it).
    """
    error: Exception | None = None
    with torch.no_grad(), TraceDict(model, layer_names(model)) as traces:
        try:
            model(example)
        except Exception as exc:
            error = exc
    rows = []
    for path, module in model.named_modules():
        trace = traces[path]
        rows.append(
            {
                "path": path,
                "type": type(module).__qualname__,
                "params": sum(p.numel() for p in module.parameters()),
                "output": describe(trace.outputs[-1]) if trace.outputs else None,
                "calls": trace.calls,
            }
        )
    return rows, error


def render(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table."""
    lines = [("path", "type", "params", "output")]
    for row in rows:
        output = row["output"] or "-"
        if row["calls"] > 1:
            output += f"  ({row['calls']} calls)"
        lines.append((row["path"] or "(model)", row["type"], f"{row['params']:,}", output))
    widths = [max(len(line[i]) for line in lines) for i in range(3)]
    return "\n".join(
        f"{path:<{widths[0]}}  {kind:<{widths[1]}}  {params:>{widths[2]}}  {output}"
        for path, kind, params, output in lines
    )


def run(args: argparse.Namespace) -> int:
    """Print the layer table of ``args.spec``; exit 1 if the dry run failed, 2 on a bad spec."""
    try:
        model = load_model(args.spec, weights=args.weights)
    except (ValueError, TypeError, LookupError, OSError, ImportError) as exc:
        print(f"nethook layers: {exc}", file=sys.stderr)
        return 2
    example = torch.zeros(args.input_shape, dtype=DTYPES[args.input_dtype])
    rows, error = layer_table(model, example)
    if args.json:
        print(
            json.dumps({"spec": args.spec, "input_shape": list(args.input_shape), "layers": rows})
        )
    else:
        print(render(rows))
    if error is not None:
        print(
            f"nethook layers: the dry run on a zero input of shape {list(args.input_shape)} "
            f"({args.input_dtype}) failed: {type(error).__name__}: {error}\n"
            "Pass the input the model expects with --input-shape (and --input-dtype long "
            "for token ids).",
            file=sys.stderr,
        )
        return 1
    return 0
