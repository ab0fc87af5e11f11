"""Retain and edit what the layers of any PyTorch model compute: ``Trace`` and ``TraceDict``.

Drop-in compatible with the ``nethook.py`` that ROME, MEMIT, EasyEdit and the dissect
code vendor (same signatures, ``.output``/``.input``, ``edit_output(output, layer)``,
``stop=True``), and beyond it:

- layer addresses are dotted paths or globs (:mod:`nethook.layers`);
- a module called several times in one forward keeps every call in ``.outputs`` /
  ``.inputs`` (``.output`` is the last call); ``edit_calls`` edits chosen calls only;
- keyword inputs are retained (``.input_kwargs``);
- tuple, namedtuple, dict and dataclass outputs are kept as they are, and an edit
  may return the same structure (checked: a different shape is an error naming the
  layer and both shapes);
- ``stop=True`` really stops the forward pass, and a context manager swallows only
  its own stop signal;
- hooks are removed on exit, on exceptions and on KeyboardInterrupt, and a trace
  never removes hooks it did not add.

Nested traces on the same module run in the order they were created: each sees the
output as edited by the traces created before it, and what it returns is what the
later ones (and the rest of the model) see.

A "forward pass" starts whenever the model given to ``Trace(model, layer)`` is
called: ``.outputs`` then starts empty. When a module is given directly
(``Trace(module)``), the trace cannot see where a pass starts, so ``.outputs`` keeps
every call until :meth:`Trace.clear`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from nethook.layers import (
    LayerNotFoundError,
    check_module,
    get_module,
    get_parameter,
    replace_module,
    resolve_layers,
    resolve_named_layer,
    set_requires_grad,
)

__all__ = [
    "EditError",
    "LayerNotFoundError",
    "StopForward",
    "Trace",
    "TraceDict",
    "describe",
    "get_module",
    "get_parameter",
    "map_tensors",
    "replace_module",
    "set_requires_grad",
]


class StopForward(Exception):
    """Raised by a hook to end the forward pass after the last layer needed.

    ``owner`` is the Trace or TraceDict that raised it; only that context manager
    swallows it, so a stop signal never vanishes into an unrelated ``with`` block.
    """

    def __init__(self, owner: object = None):
        super().__init__("forward pass stopped after the last traced layer")
        self.owner = owner


class EditError(ValueError):
    """An edit returned an output whose structure or shape differs from the layer's."""


def map_tensors(fn: Callable[[torch.Tensor], Any], x: Any) -> Any:
    """Apply ``fn`` to every tensor in ``x``, keeping its structure.

    Handles tensors, tuples (namedtuples and torch return types included), lists,
    dicts and dataclasses (Hugging Face ``ModelOutput`` is both); anything else,
    ``None`` included, is returned as it is.
    """
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, tuple):
        items = [map_tensors(fn, v) for v in x]
        if hasattr(x, "_fields"):
            return type(x)(*items)
        return tuple(items) if type(x) is tuple else type(x)(items)
    if isinstance(x, list):
        items = [map_tensors(fn, v) for v in x]
        return items if type(x) is list else type(x)(items)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        changes = {
            f.name: map_tensors(fn, getattr(x, f.name)) for f in dataclasses.fields(x) if f.init
        }
        return dataclasses.replace(x, **changes)
    if isinstance(x, dict):
        items = {k: map_tensors(fn, v) for k, v in x.items()}
        return items if type(x) is dict else type(x)(items)
    return x


def describe(x: Any) -> str:
    """A short description of the shapes in ``x``: ``[2, 8]``, ``tuple([2, 8], None)``."""
    if isinstance(x, torch.Tensor):
        return str(list(x.shape))
    if isinstance(x, (tuple, list)):
        return f"{type(x).__name__}({', '.join(describe(v) for v in x)})"
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        fields = (f"{f.name}={describe(getattr(x, f.name))}" for f in dataclasses.fields(x))
        return f"{type(x).__name__}({', '.join(fields)})"
    if isinstance(x, dict):
        return f"{type(x).__name__}({', '.join(f'{k}={describe(v)}' for k, v in x.items())})"
    return "None" if x is None else type(x).__name__


def _same_structure(old: Any, new: Any) -> bool:
    """True if ``new`` has the containers, keys and tensor shapes of ``old``."""
    if isinstance(old, torch.Tensor):
        return isinstance(new, torch.Tensor) and new.shape == old.shape
    if old is None:
        return new is None
    if isinstance(old, (tuple, list)):
        return (
            isinstance(new, tuple if isinstance(old, tuple) else list)
            and len(new) == len(old)
            and all(_same_structure(a, b) for a, b in zip(old, new, strict=True))
        )
    if isinstance(old, dict):
        return (
            isinstance(new, dict)
            and list(new) == list(old)
            and all(_same_structure(old[k], new[k]) for k in old)
        )
    if dataclasses.is_dataclass(old) and not isinstance(old, type):
        return type(new) is type(old) and all(
            _same_structure(getattr(old, f.name), getattr(new, f.name))
            for f in dataclasses.fields(old)
        )
    return True


def _adapt_edit(fn: Callable) -> Callable[[Any, str | None], Any]:
    """Wrap ``fn`` so it can always be called as ``(output, layer)``.

    Like the original's ``invoke_with_optional_args``, but decided once: a function
    with parameters named ``output``/``layer`` gets them by name; otherwise one
    taking two positional arguments gets ``(output, layer)`` and one taking a single
    argument gets ``(output)``.
    """
    if not callable(fn):
        raise TypeError(f"edit_output must be callable, got {type(fn).__qualname__}")
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return fn
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    by_name = {p.name for p in params if p.kind != p.POSITIONAL_ONLY}
    if {"output", "layer"} <= by_name:
        return lambda output, layer: fn(output=output, layer=layer)
    if len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params):
        return fn
    if "layer" in by_name:
        return lambda output, layer: fn(output, layer=layer)
    return lambda output, layer: fn(output)


def _primary_input(args: tuple, kwargs: dict) -> Any:
    """The input as the original ``nethook`` reports it, extended to keyword calls.

    The single positional argument, or the tuple of several; for a call with keyword
    arguments only (``block(hidden_states=h)``), the first keyword's value.
    """
    if args:
        return args[0] if len(args) == 1 else args
    if kwargs:
        return next(iter(kwargs.values()))
    return None


class _StopGroup:
    """Raises StopForward for ``owner`` once each of ``size`` traces has run in this pass."""

    def __init__(self, owner: object, size: int):
        self.owner = owner
        self.size = size
        self.seen: set[int] = set()

    def reset(self, *_: Any) -> None:
        """Start a new pass (used as a forward pre-hook of the model)."""
        self.seen.clear()

    def ran(self, trace: Trace) -> None:
        """Note that ``trace``'s layer ran; stop if it was the last one missing."""
        self.seen.add(id(trace))
        if len(self.seen) >= self.size:
            raise StopForward(self.owner)


class Trace(contextlib.AbstractContextManager):
    """Retain (and optionally edit) the output and input of one layer.

    ::

        with Trace(model, "layer4") as t:
            model(x)
        t.output        # the layer's output (last call), t.outputs every call

    ``module`` is the model and ``layer`` a path or glob matching one module, or
    ``module`` is the layer itself and ``layer`` is None. Options, as in the
    original: ``retain_output``, ``retain_input`` (``.input``, ``.inputs``, plus
    ``.input_kwargs``), ``clone`` (copy, so later in-place ops do not change what is
    kept), ``detach``, ``retain_grad`` (``.output.grad`` is filled by ``backward()``;
    needs grad mode), ``edit_output`` (``fn(output, layer) -> replacement``, or
    ``fn(output)``; returning None keeps the output, as after an in-place edit),
    ``stop`` (end the forward pass after this layer). ``edit_calls`` (int or ints)
    restricts the edit to those calls of the layer in each pass (0 = first call).
    Without ``clone``, :meth:`changed` tells whether an in-place op changed what was
    kept after it was kept (the tensors' version counters).

    The hooks are attached at construction and removed by :meth:`close`, which the
    ``with`` block calls on every exit.
    """

    def __init__(
        self,
        module: nn.Module,
        layer: str | None = None,
        retain_output: bool = True,
        retain_input: bool = False,
        clone: bool = False,
        detach: bool = False,
        retain_grad: bool = False,
        edit_output: Callable | None = None,
        stop: bool = False,
        *,
        edit_calls: int | Iterable[int] | None = None,
    ):
        check_module(module, "module")
        self.layer = layer
        self.module = module
        if layer is not None:
            self.layer, self.module = resolve_named_layer(module, layer)
        self.retain_output = retain_output
        self.retain_input = retain_input
        self.clone = clone
        self.detach = detach
        self.retain_grad = retain_grad
        self.stop = stop
        self.edit_output = edit_output
        self.edit_calls = _call_set(edit_calls)
        self._edit = _adapt_edit(edit_output) if edit_output is not None else None
        self._copying = clone or detach or retain_grad
        self._stop_group: _StopGroup | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.clear()
        if layer is not None:
            self._handles.append(module.register_forward_pre_hook(self._new_pass, prepend=True))
        if retain_input:
            self._handles.append(
                self.module.register_forward_pre_hook(self._input_hook, with_kwargs=True)
            )
        self._handles.append(self.module.register_forward_hook(self._hook, with_kwargs=True))

    def clear(self) -> None:
        """Forget everything retained so far (done at the start of each forward pass)."""
        self.calls = 0
        self._kept_versions: list[tuple[torch.Tensor, int]] = []
        self.outputs: list[Any] = []
        self.inputs: list[Any] = []
        self.inputs_kwargs: list[dict[str, Any]] = []
        for name in ("output", "input", "input_kwargs"):
            self.__dict__.pop(name, None)

    def _new_pass(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook on the model: a new pass starts with nothing retained."""
        if self.calls or self.inputs:
            self.clear()

    def _copy(self, x: Any, grad: bool) -> Any:
        """What to keep of ``x``: the object itself, or a detached/cloned/grad-retaining copy."""
        if not self._copying:
            return x
        grad = grad and torch.is_grad_enabled()

        def copy(t: torch.Tensor) -> torch.Tensor:
            if grad and (t.is_floating_point() or t.is_complex()):
                t = t.clone() if self.clone else t
                if not t.requires_grad:
                    t.requires_grad_(True)
                t.retain_grad()
                return t
            if self.detach:
                t = t.detach()
            return t.clone() if self.clone else t

        return map_tensors(copy, x)

    def _watch(self, kept: Any) -> Any:
        """Note the version of each tensor kept without a copy (see :meth:`changed`)."""
        if not self.clone:

            def note(t: torch.Tensor) -> torch.Tensor:
                if not t.is_inference():  # inference tensors have no version counter
                    self._kept_versions.append((t, t._version))
                return t

            map_tensors(note, kept)
        return kept

    def changed(self) -> bool:
        """Whether an in-place op has changed a tensor this trace kept (without ``clone``)
        since it was kept: then ``output``/``input`` no longer hold what the layer saw."""
        return any(t._version != version for t, version in self._kept_versions)

    def _input_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook: keep the input before the module runs (and can change it in place)."""
        kept = self._watch(self._copy(_primary_input(args, kwargs), grad=False))
        kept_kwargs = self._watch(self._copy(kwargs, grad=False)) if kwargs else {}
        self.input = kept
        self.inputs.append(kept)
        self.input_kwargs = kept_kwargs
        self.inputs_kwargs.append(kept_kwargs)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """The forward hook: edit, retain the output, maybe stop."""
        call = self.calls
        self.calls = call + 1
        replaced = False
        if self._edit is not None and (self.edit_calls is None or call in self.edit_calls):
            edited = self._edit(output, self.layer)
            if edited is not None and edited is not output:
                if not _same_structure(output, edited):
                    name = self.layer if self.layer is not None else type(module).__qualname__
                    raise EditError(
                        f"edit_output for layer {name!r} returned {describe(edited)} "
                        f"but the layer's output is {describe(output)}"
                    )
                output = edited
                replaced = True
        if self.retain_output:
            kept = self._watch(self._copy(output, grad=self.retain_grad))
            self.output = kept
            self.outputs.append(kept)
            if self.retain_grad and torch.is_grad_enabled():
                output = map_tensors(torch.clone, kept)
                replaced = True
        if self.stop:
            raise StopForward(self)
        if self._stop_group is not None:
            self._stop_group.ran(self)
        return output if replaced else None

    def __getattr__(self, name: str) -> Any:
        """Explain why ``.output``/``.input`` are missing instead of a bare AttributeError."""
        if name in ("output", "input", "input_kwargs"):
            why = (
                "retain_input=False"
                if name != "output" and not self.__dict__.get("retain_input")
                else "retain_output=False"
                if name == "output" and not self.__dict__.get("retain_output")
                else "the layer has not run since the trace began or the pass started"
            )
            raise AttributeError(f"no {name} for layer {self.__dict__.get('layer')!r}: {why}")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def close(self) -> None:
        """Remove the hooks this trace added (and only those); safe to call twice.

        Also drops the link to a TraceDict's stop group, which points back at the
        TraceDict: without that, every closed batch's retained tensors would wait for
        Python's cycle collector, and memory would grow with the number of batches.
        """
        while self._handles:
            self._handles.pop().remove()
        self._stop_group = None

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return isinstance(exc, StopForward) and exc.owner is self

    def __repr__(self) -> str:
        target = self.layer if self.layer is not None else type(self.module).__qualname__
        state = "open" if self._handles else "closed"
        return f"Trace({target!r}, calls={self.calls}, {state})"


def _call_set(calls: int | Iterable[int] | None) -> frozenset[int] | None:
    """Normalize ``edit_calls`` to a set of non-negative call indices (None = every call)."""
    if calls is None:
        return None
    values = [calls] if isinstance(calls, int) else list(calls)
    if not all(isinstance(c, int) and c >= 0 for c in values):
        raise ValueError(f"edit_calls must be call indices >= 0, got {calls!r}")
    return frozenset(values)


class TraceDict(dict, contextlib.AbstractContextManager):
    """Trace several layers at once: a dict from layer path to its :class:`Trace`.

    ::

        with TraceDict(model, ["layer1", "layer*.conv2"], stop=True) as td:
            model(x)
        td["layer1"].output

    ``layers`` holds paths and globs (globs expand in ``named_modules()`` order;
    duplicates are dropped). Options are those of :class:`Trace`, applied to every
    layer; ``edit_output`` receives ``(output, layer)`` so it can tell layers apart.
    With ``stop=True`` the forward pass ends as soon as every traced layer has run
    (once) in it, whichever order they run in. Every name is checked before any hook
    is attached.
    """

    def __init__(
        self,
        module: nn.Module,
        layers: str | Iterable[str] | None = None,
        retain_output: bool = True,
        retain_input: bool = False,
        clone: bool = False,
        detach: bool = False,
        retain_grad: bool = False,
        edit_output: Callable | None = None,
        stop: bool = False,
        *,
        edit_calls: int | Iterable[int] | None = None,
    ):
        super().__init__()
        check_module(module, "module")
        names = list(resolve_layers(module, layers))
        self.stop = stop
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        try:
            for name in names:
                self[name] = Trace(
                    module,
                    name,
                    retain_output=retain_output,
                    retain_input=retain_input,
                    clone=clone,
                    detach=detach,
                    retain_grad=retain_grad,
                    edit_output=edit_output,
                    edit_calls=edit_calls,
                )
            if stop and names:
                group = _StopGroup(self, len(names))
                self._handles.append(module.register_forward_pre_hook(group.reset, prepend=True))
                for trace in self.values():
                    trace._stop_group = group
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Remove every hook the traces added, last attached first."""
        for trace in reversed(self.values()):
            trace.close()
        while self._handles:
            self._handles.pop().remove()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return isinstance(exc, StopForward) and exc.owner is self

    def __repr__(self) -> str:
        return f"TraceDict({list(self)!r})"
