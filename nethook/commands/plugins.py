"""``nethook plugins``: list installed plugins, what they provide, and which are broken."""

from __future__ import annotations

import argparse
import json
import textwrap

from nethook.plugins import NethookPluginManager, PluginInfo, get_plugin_manager


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``plugins`` subcommand."""
    parser = subparsers.add_parser(
        "plugins",
        help="list installed plugins (name, kinds, distribution, version, location, errors)",
        description=(
            "List every plugin found through the 'nethook' entry-point group: what it "
            "provides, the distribution it comes from and where it was loaded from. "
            "Plugins that failed to load are shown with their traceback."
        ),
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit with status 1 if any plugin is broken or two plugins claim one name",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the plugin listing; returns 1 under ``--check`` when something is wrong."""
    manager = get_plugin_manager()
    manager.collect_all()
    conflicts = manager.conflicts()
    infos = list(manager.infos.values())
    if args.json:
        print(json.dumps(_as_json(infos, conflicts), indent=2))
    else:
        print(render(manager))
    problems = bool(conflicts) or any(not info.ok for info in infos)
    return 1 if args.check and problems else 0


def _as_json(infos: list[PluginInfo], conflicts: list) -> dict:
    """Plugins and conflicts as plain JSON-ready data."""
    return {
        "plugins": [info.to_json() for info in infos],
        "conflicts": [
            {
                "kind": kind,
                "name": name,
                "plugins": [p.name for p in plugins],
                "distributions": [p.origin for p in plugins],
            }
            for kind, name, plugins in conflicts
        ],
    }


def render(manager: NethookPluginManager) -> str:
    """Human-readable listing: one block per plugin, then name conflicts."""
    infos = list(manager.infos.values())
    if not infos:
        return "no plugins installed (none found in entry-point group 'nethook')"
    blocks = []
    for info in infos:
        status = "ok" if info.ok else "BROKEN"
        lines = [
            f"{info.name}  [{status}]",
            f"  kinds:        {', '.join(info.kinds) or '-'}",
            f"  distribution: {info.distribution or '-'} {info.version or ''}".rstrip(),
            f"  loaded from:  {info.location or info.value}",
        ]
        lines += [f"  {kind}: {', '.join(names)}" for kind, names in info.provides.items()]
        for error in info.errors:
            lines.append("  error:")
            lines.append(textwrap.indent(error.rstrip(), "    "))
        blocks.append("\n".join(lines))
    conflicts = manager.conflicts()
    if conflicts:
        lines = ["name conflicts:"]
        for kind, name, plugins in conflicts:
            claimants = ", ".join(f"{p.origin} (plugin {p.name!r})" for p in plugins)
            lines.append(f"  {kind} {name!r} claimed by {claimants}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
