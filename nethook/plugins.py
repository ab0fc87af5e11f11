"""The plugin host: discovery through entry points and a registry by name.

Every plugin — first-party ones under ``plugins/`` included — is a distribution
that declares an entry point in the group ``nethook``::

    [project.entry-points.nethook]
    myplugin = "my_package.nethook_plugin"

The host loads each entry point, registers the object with a pluggy
:class:`NethookPluginManager` and asks the registration hooks (see
:mod:`nethook.hookspec`) which names each plugin provides. A plugin that fails
to import or to register is recorded with its traceback (``nethook plugins``
shows it) and does not break anything that does not need it.

Objects are looked up by spec, ``name`` or ``name:arg``; the factory registered
under ``name`` receives ``arg``::

    source = get_source("broden:/data/broden1_224,split=train")
    seg = get_segmenter("colors")
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib.metadata
import inspect
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pluggy

from nethook import hookspec

__all__ = [
    "ENTRY_POINT_GROUP",
    "KINDS",
    "NethookPluginManager",
    "PluginConflictError",
    "PluginError",
    "PluginInfo",
    "Registration",
    "UnknownNameError",
    "get",
    "get_intervention",
    "get_inverter",
    "get_plugin_manager",
    "get_rewriter",
    "get_scorer",
    "get_segmenter",
    "get_source",
    "hookimpl",
    "parse_kwargs",
    "split_spec",
]

hookimpl = pluggy.HookimplMarker("nethook")
"""Marker for functions implementing a hook of :mod:`nethook.hookspec`."""

ENTRY_POINT_GROUP = "nethook"

KINDS: dict[str, str] = {
    "source": "nethook_concept_sources",
    "segmenter": "nethook_segmenters",
    "scorer": "nethook_scorers",
    "intervention": "nethook_interventions",
    "inverter": "nethook_inverters",
    "rewriter": "nethook_rewriters",
}
"""Plugin kind -> the registration hook that provides it."""

_OTHER_HOOKS = {"nethook_add_commands": "commands", "nethook_report_sections": "report"}


class PluginError(Exception):
    """A plugin could not be found, loaded or used."""


class PluginConflictError(PluginError):
    """Two plugins claim the same name."""


class UnknownNameError(PluginError, LookupError):
    """No installed plugin provides the requested name."""

    def __str__(self) -> str:  # LookupError would quote the message like a key
        return str(self.args[0]) if self.args else ""


@dataclass
class PluginInfo:
    """What the host knows about one plugin (one entry point)."""

    name: str
    """Entry-point name, also the pluggy plugin name."""
    value: str
    """What the entry point points at, e.g. ``nethook_plugins.broden``."""
    distribution: str | None = None
    version: str | None = None
    location: str | None = None
    """File the plugin was loaded from (or the entry-point value if it never loaded)."""
    provides: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Kind -> names registered (only kinds with at least one name)."""
    hooks: tuple[str, ...] = ()
    """Names of the hooks this plugin implements."""
    errors: list[str] = field(default_factory=list)
    """Tracebacks of failures while importing, registering or calling hooks."""

    @property
    def ok(self) -> bool:
        """True when nothing about this plugin has failed so far."""
        return not self.errors

    @property
    def kinds(self) -> tuple[str, ...]:
        """Plugin kinds it provides, plus ``commands`` / ``report`` for the other hooks."""
        extra = tuple(kind for hook, kind in _OTHER_HOOKS.items() if hook in self.hooks)
        return tuple(self.provides) + extra

    @property
    def origin(self) -> str:
        """Distribution and version, for messages (``nethook 0.1.0``)."""
        if self.distribution is None:
            return f"no distribution ({self.value})"
        return f"{self.distribution} {self.version}"

    def to_json(self) -> dict[str, Any]:
        """Plain-dict form for ``nethook plugins --json``."""
        return {
            "name": self.name,
            "value": self.value,
            "distribution": self.distribution,
            "version": self.version,
            "location": self.location,
            "kinds": list(self.kinds),
            "provides": {kind: list(names) for kind, names in self.provides.items()},
            "ok": self.ok,
            "errors": list(self.errors),
        }


@dataclass(frozen=True)
class Registration:
    """One name registered for one kind by one plugin."""

    kind: str
    name: str
    factory: Callable[[str], Any]
    plugin: PluginInfo


def split_spec(spec: str) -> tuple[str, str]:
    """Split ``"name:arg"`` at the first colon -> ``(name, arg)``; ``arg`` may be empty."""
    name, _, arg = spec.partition(":")
    name = name.strip()
    if not name:
        raise ValueError(f"plugin spec {spec!r}: expected 'name' or 'name:arguments'")
    return name, arg


def _parse_value(text: str) -> Any:
    """A Python literal if ``text`` is one (1, 0.5, True, None, 'x'), else the string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


_OPEN, _CLOSE = "([{", ")]}"


def _split_items(arg: str) -> list[str]:
    """Split at commas that are not inside brackets or quotes: ``a=[1,2],b=x`` -> 2 items."""
    items, start, depth, quote = [], 0, 0, ""
    for i, char in enumerate(arg):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in _OPEN:
            depth += 1
        elif char in _CLOSE:
            depth = max(depth - 1, 0)
        elif char == "," and depth == 0:
            items.append(arg[start:i])
            start = i + 1
    items.append(arg[start:])
    return [item.strip() for item in items]


def parse_kwargs(arg: str, positional: Sequence[str] = ()) -> dict[str, Any]:
    """Parse the argument part of a spec, ``"a=1,b=x"`` -> ``{"a": 1, "b": "x"}``.

    Values that read as Python literals become numbers, booleans, None or lists
    (``units=[3,7]``; commas inside brackets or quotes do not separate items);
    ``true``/``false``/``none`` in any case count too; anything else stays a string.
    Leading items without ``=`` bind, as strings, to the names in ``positional``, so
    ``parse_kwargs("/data/broden,split=train", ["path"])`` gives
    ``{"path": "/data/broden", "split": "train"}``.
    """
    result: dict[str, Any] = {}
    items = _split_items(arg) if arg.strip() else []
    names = list(positional)
    keywords_started = False
    for i, item in enumerate(items):
        key, eq, value = item.partition("=")
        if not eq:
            if keywords_started or not names:
                expected = (
                    f"{', '.join(positional)} first, then key=value" if positional else "key=value"
                )
                raise ValueError(
                    f"plugin arguments {arg!r}: item {i + 1} ({item!r}) is not key=value; "
                    f"expected {expected} items separated by commas"
                )
            result[names.pop(0)] = item
            continue
        keywords_started = True
        key = key.strip()
        if not key.isidentifier():
            raise ValueError(
                f"plugin arguments {arg!r}: {key!r} is not a valid argument name "
                "(expected key=value with key a Python identifier)"
            )
        if key in result:
            raise ValueError(f"plugin arguments {arg!r}: {key!r} is given twice")
        result[key] = _parse_value(value.strip())
    return result


def _distribution(entry_point: importlib.metadata.EntryPoint) -> tuple[str | None, str | None]:
    """(name, version) of the distribution that declares ``entry_point``, if known."""
    dist = getattr(entry_point, "dist", None)
    if dist is None:
        return None, None
    return dist.metadata["Name"], dist.version


def _location(plugin: object, fallback: str) -> str:
    """The file a plugin object comes from (module file, or its class's file)."""
    path = getattr(plugin, "__file__", None)
    if path:
        return str(path)
    for obj in (plugin, type(plugin)):
        try:
            return inspect.getfile(obj)  # type: ignore[arg-type]
        except (TypeError, OSError):
            continue
    return fallback


class NethookPluginManager(pluggy.PluginManager):
    """A pluggy manager for project ``nethook`` that remembers who provides what.

    Use :func:`get_plugin_manager` for the shared, entry-point-loaded instance; make
    a fresh one (and call :meth:`load_entry_points` with your own entry points) to
    test plugins in isolation.
    """

    def __init__(self) -> None:
        super().__init__("nethook")
        self.add_hookspecs(hookspec)
        self.infos: dict[str, PluginInfo] = {}
        self._registries: dict[str, dict[str, list[Registration]]] = {}

    def load_entry_points(
        self, entry_points: Iterable[importlib.metadata.EntryPoint] | None = None
    ) -> None:
        """Load and register every entry point of group ``nethook`` (or those given, in order).

        Installed entry points load sorted by name, then distribution, so listings and
        messages do not depend on the order of ``sys.path``.
        """
        if entry_points is None:
            found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
            entry_points = sorted(found, key=lambda ep: (ep.name, _distribution(ep)[0] or ""))
        for entry_point in entry_points:
            self.load_entry_point(entry_point)

    def load_entry_point(self, entry_point: importlib.metadata.EntryPoint) -> PluginInfo:
        """Import one entry point and register it; failures are recorded, not raised."""
        distribution, version = _distribution(entry_point)
        info = PluginInfo(
            name=entry_point.name,
            value=entry_point.value,
            distribution=distribution,
            version=version,
            location=entry_point.value,
        )
        previous = self.infos.get(entry_point.name)
        if previous is not None:
            info.errors.append(
                f"PluginConflictError: plugin name {entry_point.name!r} is claimed by both "
                f"{previous.origin} ({previous.value}) and {info.origin} ({info.value}); "
                f"only the first is loaded. Uninstall one of them."
            )
            self.infos[f"{entry_point.name} ({info.origin})"] = info
            return info
        self.infos[entry_point.name] = info
        try:
            plugin = entry_point.load()
        except Exception as exc:
            info.errors.append(_format_error(exc))
            return info
        info.location = _location(plugin, entry_point.value)
        self.register_plugin(plugin, info)
        return info

    def register_plugin(self, plugin: object, info: PluginInfo) -> bool:
        """Register ``plugin`` under ``info.name``; True on success, else the error is recorded."""
        self.infos.setdefault(info.name, info)
        try:
            self.register(plugin, name=info.name)
            unknown = [
                caller.name
                for caller in self.get_hookcallers(plugin) or []
                if not caller.has_spec()
            ]
            if unknown:
                self.unregister(plugin)
                known = ", ".join(sorted(KINDS.values()) + sorted(_OTHER_HOOKS))
                raise PluginError(
                    f"plugin {info.name!r} implements unknown hook(s) {', '.join(unknown)}; "
                    f"nethook hooks are: {known}"
                )
        except Exception as exc:
            info.errors.append(_format_error(exc))
            return False
        info.hooks = tuple(caller.name for caller in self.get_hookcallers(plugin) or [])
        self._registries.clear()
        return True

    def registrations(self, kind: str) -> dict[str, list[Registration]]:
        """Name -> registrations for ``kind``; more than one means a conflict."""
        if kind not in KINDS:
            raise ValueError(f"unknown plugin kind {kind!r}; expected one of {', '.join(KINDS)}")
        if kind in self._registries:
            return self._registries[kind]
        table: dict[str, list[Registration]] = {}
        hook_name = KINDS[kind]
        for impl in getattr(self.hook, hook_name).get_hookimpls():
            info = self.infos[impl.plugin_name]
            try:
                provided = impl.function()
                if provided is None:
                    continue
                if not isinstance(provided, Mapping):
                    raise PluginError(
                        f"{hook_name} of plugin {info.name!r} returned "
                        f"{type(provided).__name__}; expected a dict name -> factory"
                    )
                for name, factory in provided.items():
                    if not isinstance(name, str) or not name or ":" in name:
                        raise PluginError(
                            f"{hook_name} of plugin {info.name!r}: name {name!r} must be a "
                            "non-empty string without ':'"
                        )
                    if not callable(factory):
                        raise PluginError(
                            f"{hook_name} of plugin {info.name!r}: factory for {name!r} is "
                            f"{type(factory).__name__}, expected a callable taking the spec argument"
                        )
            except Exception as exc:
                info.errors.append(_format_error(exc))
                continue
            for name, factory in provided.items():
                table.setdefault(name, []).append(Registration(kind, name, factory, info))
            info.provides[kind] = tuple(sorted(set(info.provides.get(kind, ())) | set(provided)))
        self._registries[kind] = table
        return table

    def collect_all(self) -> None:
        """Ask every plugin for every kind (fills ``PluginInfo.provides``)."""
        for kind in KINDS:
            self.registrations(kind)

    def conflicts(self) -> list[tuple[str, str, list[PluginInfo]]]:
        """(kind, name, plugins) for every name claimed by more than one plugin."""
        return [
            (kind, name, [reg.plugin for reg in regs])
            for kind in KINDS
            for name, regs in sorted(self.registrations(kind).items())
            if len(regs) > 1
        ]

    def names(self, kind: str) -> list[str]:
        """Sorted names available for ``kind``."""
        return sorted(self.registrations(kind))

    def lookup(self, kind: str, name: str) -> Registration:
        """The one registration of ``name`` for ``kind``; clear errors otherwise."""
        regs = self.registrations(kind).get(name, [])
        if len(regs) > 1:
            claimants = " and ".join(f"{r.plugin.origin} (plugin {r.plugin.name!r})" for r in regs)
            raise PluginConflictError(
                f"{kind} {name!r} is claimed by {len(regs)} plugins: {claimants}; "
                "uninstall one of these distributions"
            )
        if not regs:
            raise UnknownNameError(self._unknown_message(kind, name))
        return regs[0]

    def _unknown_message(self, kind: str, name: str) -> str:
        """Explain an unknown name: what is installed, and which plugins are broken."""
        installed = self.names(kind)
        message = f"no {kind} named {name!r}; installed {kind}s: " + (
            ", ".join(installed) if installed else "(none)"
        )
        broken = [info for info in self.infos.values() if not info.ok]
        if broken:
            summary = "; ".join(f"{info.name} ({_last_line(info.errors[-1])})" for info in broken)
            message += f". Plugins that failed to load: {summary}"
        return message + ". Run `nethook plugins` for details."

    def build(self, kind: str, spec: str | Any) -> Any:
        """Build the object a spec names: ``"name:arg"`` -> ``factory(arg)``.

        A non-string ``spec`` is taken to be the object itself and returned as is.
        """
        if not isinstance(spec, str):
            return spec
        name, arg = split_spec(spec)
        registration = self.lookup(kind, name)
        try:
            return registration.factory(arg)
        except Exception as exc:
            exc.add_note(
                f"while building {kind} {spec!r} with plugin {registration.plugin.name!r} "
                f"({registration.plugin.origin})"
            )
            raise

    def add_commands(self, subparsers: argparse._SubParsersAction) -> None:
        """Let each plugin add its subcommands; one that raises is recorded and skipped."""
        for impl in self.hook.nethook_add_commands.get_hookimpls():
            try:
                impl.function(subparsers=subparsers)
            except Exception as exc:
                self.infos[impl.plugin_name].errors.append(_format_error(exc))

    def report_sections(self, report: str, results: Mapping[str, Any]) -> list[tuple[str, str]]:
        """Collect ``(title, html)`` sections from every plugin; failures are recorded."""
        sections: list[tuple[str, str]] = []
        for impl in self.hook.nethook_report_sections.get_hookimpls():
            try:
                sections.extend(impl.function(report=report, results=results) or ())
            except Exception as exc:
                self.infos[impl.plugin_name].errors.append(_format_error(exc))
        return sections


_HOST_FILES = (__file__, importlib.__file__.rsplit("/", 1)[0])


def _format_error(exc: BaseException) -> str:
    """A traceback without the host's and importlib's own frames (they are noise)."""
    summary = traceback.TracebackException.from_exception(exc)
    frames = [
        frame
        for frame in summary.stack
        if not frame.filename.startswith(_HOST_FILES) and "<frozen importlib" not in frame.filename
    ]
    summary.stack = traceback.StackSummary.from_list(frames)
    return "".join(summary.format())


def _last_line(text: str) -> str:
    """The last non-empty line of a traceback (the exception itself)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else text


@functools.cache
def get_plugin_manager() -> NethookPluginManager:
    """The shared plugin manager with every installed plugin loaded (cached).

    Call ``get_plugin_manager.cache_clear()`` to rediscover after installing one.
    """
    manager = NethookPluginManager()
    manager.load_entry_points()
    return manager


def get(kind: str, spec: str | Any) -> Any:
    """Build a plugin object of ``kind`` (see :data:`KINDS`) from ``spec``."""
    return get_plugin_manager().build(kind, spec)


def get_source(spec: str | Any) -> Any:
    """A concept source from a spec such as ``broden:/data/broden1_224`` or ``scenes:n=200``."""
    return get("source", spec)


def get_segmenter(spec: str | Any) -> Any:
    """A segmenter from a spec such as ``colors``."""
    return get("segmenter", spec)


def get_scorer(spec: str | Any) -> Any:
    """A scorer from a spec."""
    return get("scorer", spec)


def get_intervention(spec: str | Any) -> Any:
    """An intervention (an ``edit_output(output, layer)`` callable) from a spec."""
    return get("intervention", spec)


def get_inverter(spec: str | Any) -> Any:
    """An inverter from a spec."""
    return get("inverter", spec)


def get_rewriter(spec: str | Any) -> Any:
    """A rewriter from a spec."""
    return get("rewriter", spec)
