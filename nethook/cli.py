"""The ``nethook`` command line: core subcommands plus those that plugins add.

Each core subcommand lives in its own module under :mod:`nethook.commands` and
exposes ``register(subparsers)``, which adds a parser whose ``func`` default takes
the parsed arguments and returns an exit code. Plugins add subcommands through the
``nethook_add_commands`` hook, the same way.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

CORE_COMMANDS = (
    "demo",
    "layers",
    "plugins",
    "record",
    "info",
    "dissect",
    "gandissect",
    "ace",
    "intervene",
    "fsd",
    "invert",
)

#: What bad input raises (a wrong layer name, a missing file, a bad option value): the
#: CLI prints its message instead of a traceback. Other exceptions are bugs and keep theirs.
USER_ERRORS = (ValueError, LookupError, FileNotFoundError, NotADirectoryError, PermissionError)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with every core and plugin subcommand."""
    parser = argparse.ArgumentParser(
        prog="nethook",
        description="Look inside any PyTorch network and change it.",
    )
    from nethook import __version__

    parser.add_argument("--version", action="version", version=f"nethook {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in CORE_COMMANDS:
        importlib.import_module(f"nethook.commands.{name}").register(sub)
    _add_plugin_commands(sub)
    return parser


def _add_plugin_commands(sub) -> None:
    """Let installed plugins add their subcommands; a broken plugin never breaks the CLI."""
    from nethook.plugins import get_plugin_manager

    get_plugin_manager().add_commands(sub)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``nethook`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; everything written so far is kept", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if os.environ.get("NETHOOK_TRACEBACK"):
            raise
        print(f"nethook {args.command}: error: {exc}", file=sys.stderr)
        print("(set NETHOOK_TRACEBACK=1 to see where it was raised)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
