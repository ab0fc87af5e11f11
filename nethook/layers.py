"""Finding modules inside a model by dotted name or glob pattern.

A layer address is a path from ``model.named_modules()`` (``"layer3.1.conv2"``,
``"blocks.0.mlp"``, ``""`` for the model itself) or a glob over those paths
(``"layer*.conv2"``, ``"blocks.*.mlp"``; ``*`` also matches dots). A name that
matches nothing fails at once, naming the closest valid paths.

Also holds the module helpers of the ``nethook.py`` that ROME, MEMIT and the
dissect code vendor (``get_module``, ``get_parameter``, ``replace_module``,
``set_requires_grad``), so their call sites keep working.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable

import torch
from torch import nn

GLOB_CHARS = frozenset("*?[")


class LayerNotFoundError(LookupError):
    """A layer name or pattern that matches no module of the model."""


def check_module(obj: object, what: str = "module") -> nn.Module:
    """Return ``obj`` if it is an ``nn.Module``; otherwise raise a TypeError naming its type."""
    if not isinstance(obj, nn.Module):
        raise TypeError(f"{what} must be a torch.nn.Module, got {type(obj).__qualname__}")
    return obj


def is_glob(pattern: str) -> bool:
    """True if ``pattern`` holds glob characters (``*``, ``?``, ``[``)."""
    return not GLOB_CHARS.isdisjoint(pattern)


def layer_names(model: nn.Module) -> list[str]:
    """Every module path of ``model`` in ``named_modules()`` order, ``""`` first."""
    return [name for name, _ in model.named_modules()]


def _not_found(model: nn.Module, pattern: str, names: list[str]) -> LayerNotFoundError:
    """Build the error for ``pattern``, suggesting the closest valid paths."""
    what = "pattern" if is_glob(pattern) else "layer"
    close = difflib.get_close_matches(pattern, [n for n in names if n], n=5, cutoff=0.5)
    if close:
        hint = "closest: " + ", ".join(repr(n) for n in close)
    else:
        shown = [n for n in names if n and "." not in n][:10]
        hint = "top-level layers: " + ", ".join(repr(n) for n in shown)
    return LayerNotFoundError(
        f"{type(model).__qualname__} has no {what} {pattern!r} ({hint}); "
        "list every path with `nethook layers SPEC`"
    )


def resolve_named_layer(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    """Return ``(path, module)`` for a path or a glob that matches exactly one module."""
    check_module(model, "model")
    if not isinstance(name, str):
        raise TypeError(f"layer name must be a str, got {type(name).__qualname__}")
    if is_glob(name):
        found = resolve_layers(model, [name])
        if len(found) != 1:
            raise LayerNotFoundError(
                f"layer pattern {name!r} matches {len(found)} modules "
                f"({', '.join(list(found)[:5])}{', ...' if len(found) > 5 else ''}); "
                "Trace needs exactly one: use TraceDict for several"
            )
        return next(iter(found.items()))
    try:
        return name, model.get_submodule(name)
    except AttributeError:
        raise _not_found(model, name, layer_names(model)) from None


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """Return the module at path ``name`` (a glob must match exactly one module)."""
    return resolve_named_layer(model, name)[1]


def resolve_layers(model: nn.Module, patterns: str | Iterable[str]) -> dict[str, nn.Module]:
    """Expand names and globs into an ordered ``{path: module}`` without duplicates.

    Exact names keep the order given; each glob expands in ``named_modules()`` order.
    Every pattern is checked before anything is returned, so a typo fails before
    any hook is attached.
    """
    check_module(model, "model")
    if isinstance(patterns, str):
        patterns = [patterns]
    if patterns is None:
        raise TypeError("layers must be a layer name or a list of layer names, got None")
    modules = dict(model.named_modules())
    names = list(modules)
    found: dict[str, nn.Module] = {}
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"layer name must be a str, got {type(pattern).__qualname__}")
        if is_glob(pattern):
            matches = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
            if not matches:
                raise _not_found(model, pattern, names)
            for n in matches:
                found.setdefault(n, modules[n])
        elif pattern not in found:
            found[pattern] = (
                modules[pattern] if pattern in modules else resolve_layer(model, pattern)
            )
    return found


def get_module(model: nn.Module, name: str) -> nn.Module:
    """Return the named module (ROME/dissect compatible name for :func:`resolve_layer`)."""
    return resolve_layer(model, name)


def get_parameter(model: nn.Module, name: str) -> nn.Parameter:
    """Return the parameter at dotted path ``name``, with suggestions if there is none."""
    check_module(model, "model")
    params = dict(model.named_parameters())
    if name in params:
        return params[name]
    close = difflib.get_close_matches(name, list(params), n=5, cutoff=0.5)
    raise LayerNotFoundError(
        f"{type(model).__qualname__} has no parameter {name!r}"
        + (f" (closest: {', '.join(repr(n) for n in close)})" if close else "")
    )


def replace_module(model: nn.Module, name: str, new_module: nn.Module) -> nn.Module:
    """Put ``new_module`` at path ``name`` and return the module it replaced."""
    check_module(new_module, "new_module")
    old = resolve_layer(model, name)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new_module)
    return old


def set_requires_grad(requires_grad: bool, *models: nn.Module | torch.Tensor) -> None:
    """Set ``requires_grad`` on every parameter of the given modules (or on tensors)."""
    for model in models:
        if isinstance(model, nn.Module):
            for param in model.parameters():
                param.requires_grad = requires_grad
        elif isinstance(model, torch.Tensor):
            model.requires_grad = requires_grad
        else:
            raise TypeError(f"expected a Module or Tensor, got {type(model).__qualname__}")
