"""Interventions: small objects that change a layer's output, usable as ``edit_output``.

Each acts on selected units (channels) of the layer's output, optionally only inside
a region: a spatial ``mask`` (``[H, W]`` for conv outputs ``[B, C, H, W]``, or
``[T]`` for token outputs ``[B, T, C]``; or one per image, ``[B, H, W]`` or
``[B, T]``; values in [0, 1], fractional values blend) or token ``positions`` (for
``[B, T, C]``). The channel dimension is 1 for outputs
of 4 or more dimensions and the last one for ``[B, T, C]`` and ``[B, C]``; pass
``channel_dim`` to override. Inside the region a unit's value ``r`` becomes the
intervention's target; outside, and for every other unit, the output is unchanged:
``r + region * (target - r)``.

======================  =======================================
``Ablate``              target 0
``Replace``             target ``k`` (one constant per unit)
``Scale``               target ``s * r``
``AddDirection``        target ``r + scale * d`` (all units)
``PartialAblate``       target 0 with strength ``a`` in [0, 1] per unit
``PartialInsert``       target ``k`` with strength ``a`` per unit
======================  =======================================

The last two are the partial ablation and insertion of GAN Dissection: inside the
region ``p`` unit ``u`` becomes ``(1 - a_u p) r + a_u p k_u`` (``k = 0`` for
ablation). Their ``alpha`` and ``values`` may be tensors (one value per unit, or
one for all), used as they are, so gradients flow to them and an optimizer's
in-place updates are seen; a ``mask`` tensor is used as is too (no copy through
Python lists). Every intervention has a readable ``repr`` and a JSON description:
``x.to_json()`` (tensors written as lists) and :func:`from_json` round-trip. Register more with :func:`register` (the plugin host
does this for the ``nethook_interventions`` hook).

Used as ``edit_output``, an intervention edits the first tensor of a tuple, list,
dict or dataclass output (the hidden state of Hugging Face style layers) and keeps
the rest of the structure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch

from nethook.trace import map_tensors

__all__ = [
    "REGISTRY",
    "AddDirection",
    "Ablate",
    "Intervention",
    "PartialAblate",
    "PartialInsert",
    "Replace",
    "Scale",
    "from_json",
    "register",
]

REGISTRY: dict[str, type[Intervention]] = {}


def register(cls: type[Intervention] | None = None, *, name: str | None = None):
    """Add an Intervention subclass to the registry :func:`from_json` reads (a decorator).

    The registered name (default: the class name) is the ``"type"`` of its JSON.
    """

    def add(c: type[Intervention]) -> type[Intervention]:
        if not (isinstance(c, type) and issubclass(c, Intervention)):
            raise TypeError(f"register expects an Intervention subclass, got {c!r}")
        key = name or c.__name__
        REGISTRY[key] = c
        c.kind = key
        return c

    return add if cls is None else add(cls)


def from_json(d: dict[str, Any]) -> Intervention:
    """Rebuild an intervention from its ``to_json()`` description."""
    if not isinstance(d, dict) or "type" not in d:
        raise ValueError(f"intervention JSON must be a dict with a 'type' key, got {d!r}")
    params = dict(d)
    kind = params.pop("type")
    if kind not in REGISTRY:
        raise ValueError(
            f"unknown intervention type {kind!r}; known: {', '.join(sorted(REGISTRY))}"
        )
    return REGISTRY[kind](**params)


def _floats(values: Any, what: str) -> list[float] | float:
    """A float or a flat list of floats from a number, list, array or tensor."""
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        return float(values)
    flat = torch.as_tensor(values, dtype=torch.float64).flatten().tolist()
    if not flat:
        raise ValueError(f"{what} must not be empty")
    return flat


def _plain(value: Any) -> Any:
    """``value`` with a tensor turned into a float or a (nested) list, for JSON and repr."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().double().tolist()
    return value


def _tensor_or_floats(values: Any, what: str) -> torch.Tensor | list[float] | float:
    """A tensor (flattened to one value or one per unit, kept as is so gradients flow),
    else a float or a flat list of floats as :func:`_floats` gives."""
    if not isinstance(values, torch.Tensor):
        return _floats(values, what)
    if values.numel() == 0:
        raise ValueError(f"{what} must not be empty")
    if values.is_complex() or not (values.is_floating_point() or values.dtype == torch.bool):
        values = values.double()
    return values if values.ndim == 0 else values.reshape(-1)


def _short(values: Any, limit: int = 6) -> str:
    """A list written in full when short, else its start and length."""
    if not isinstance(values, list) or len(values) <= limit:
        return repr(values)
    head = ", ".join(f"{v:g}" if isinstance(v, float) else repr(v) for v in values[:limit])
    return f"[{head}, ... ({len(values)})]"


@dataclasses.dataclass(eq=False, repr=False)
class Intervention:
    """Base class: change ``units`` of a layer's output inside an optional region.

    Subclasses set :meth:`target`; this class selects units, builds the region from
    ``mask``/``positions`` and blends. ``units`` are channel indices (None = every
    channel).
    """

    units: Sequence[int] | None = None
    mask: Any = None
    positions: Sequence[int] | None = None
    channel_dim: int | None = None

    kind: ClassVar[str] = "Intervention"

    def __post_init__(self) -> None:
        if self.units is not None:
            units = self.units
            if isinstance(units, int):
                units = [units]
            elif isinstance(units, (set, frozenset, range)):
                units = list(units)
            units = torch.as_tensor(units).flatten().tolist()
            if not all(isinstance(u, int) and u >= 0 for u in units):
                raise ValueError(f"units must be channel indices >= 0, got {self.units!r}")
            self.units = units
        if self.mask is not None:
            mask = self.mask
            if not isinstance(mask, torch.Tensor):
                mask = torch.as_tensor(mask, dtype=torch.float64)
            check = mask.detach()
            if check.numel() and (check.min() < 0 or check.max() > 1):
                raise ValueError("mask values must lie in [0, 1]")
            self.mask = mask if isinstance(self.mask, torch.Tensor) else mask.tolist()
        if self.positions is not None:
            self.positions = [int(p) for p in torch.as_tensor(self.positions).flatten().tolist()]
        if self.mask is not None and self.positions is not None:
            raise ValueError("give a mask or token positions, not both")
        self._cache: dict[tuple, torch.Tensor] = {}

    def _constant(self, name: str, values: Any, like: torch.Tensor, dtype=None) -> torch.Tensor:
        """``values`` as a tensor on ``like``'s device, built once per device and dtype.

        A tensor is converted on every call instead (no cache), so gradients reach it
        and in-place changes to it are seen.
        """
        dtype = dtype or like.dtype
        if isinstance(values, torch.Tensor):
            return values.to(device=like.device, dtype=dtype)
        key = (name, like.device, dtype)
        if key not in self._cache:
            self._cache[key] = torch.as_tensor(values, dtype=dtype, device=like.device)
        return self._cache[key]

    def target(self, r: torch.Tensor) -> torch.Tensor:
        """The value the selected units take inside the region (``r``: their values)."""
        raise NotImplementedError

    def strength(self, r: torch.Tensor) -> torch.Tensor | None:
        """How far each selected unit moves toward :meth:`target` (multiplies the region;
        None: all the way). Partial interventions return their ``alpha``."""
        return None

    def per_unit(self, values: float | list[float], r: torch.Tensor, what: str) -> torch.Tensor:
        """``values`` (a scalar or one per selected unit) shaped to broadcast against ``r``."""
        t = self._constant(what, values, r)
        if t.ndim == 0:
            return t
        cdim = self._cdim(r)
        if t.numel() != r.shape[cdim]:
            raise ValueError(
                f"{type(self).__name__}: {what} has {t.numel()} values for {r.shape[cdim]} units"
            )
        shape = [1] * r.ndim
        shape[cdim] = -1
        return t.view(shape)

    def _cdim(self, x: torch.Tensor) -> int:
        """The channel dimension of ``x`` as a non-negative index."""
        if self.channel_dim is not None:
            return self.channel_dim % x.ndim
        return 1 if x.ndim >= 4 else x.ndim - 1

    def _region(self, x: torch.Tensor, cdim: int) -> torch.Tensor | None:
        """The blend weights (1 = fully changed) broadcastable to ``x``; None = everywhere."""
        if self.mask is None and self.positions is None:
            return None
        spatial = [d for d in range(1, x.ndim) if d != cdim]
        sizes = [x.shape[d] for d in spatial]
        if self.mask is not None:
            region = self._constant("mask", self.mask, x)
            per_image = [x.shape[0], *sizes]
            if list(region.shape) == per_image and x.ndim > 1:
                view = [1] * x.ndim
                view[0] = x.shape[0]
                for d, size in zip(spatial, sizes, strict=True):
                    view[d] = size
                return region.reshape(view)
            if list(region.shape) != sizes:
                raise ValueError(
                    f"{type(self).__name__}: mask has shape {list(region.shape)} but the "
                    f"output {list(x.shape)} has spatial shape {sizes} (or, one mask per "
                    f"image, {per_image})"
                )
        else:
            if len(sizes) != 1:
                raise ValueError(
                    f"{type(self).__name__}: token positions need a [B, T, C] output, "
                    f"got shape {list(x.shape)}"
                )
            if any(p >= sizes[0] or p < -sizes[0] for p in self.positions):
                raise ValueError(
                    f"{type(self).__name__}: positions {self.positions} out of range "
                    f"for {sizes[0]} tokens"
                )
            region = torch.zeros(sizes, dtype=x.dtype, device=x.device)
            region[self.positions] = 1
        view = [1] * x.ndim
        for d, size in zip(spatial, sizes, strict=True):
            view[d] = size
        return region.view(view)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Return the edited copy of tensor ``x`` (``x`` itself is not modified)."""
        cdim = self._cdim(x)
        if self.units is None:
            r, index = x, None
        else:
            if self.units and max(self.units) >= x.shape[cdim]:
                raise ValueError(
                    f"{type(self).__name__}: unit {max(self.units)} out of range for "
                    f"{x.shape[cdim]} channels in output of shape {list(x.shape)}"
                )
            index = self._constant("units", self.units, x, torch.long)
            r = x.index_select(cdim, index)
        target = self.target(r).to(x.dtype)
        region = self._region(x, cdim)
        strength = self.strength(r)
        if strength is not None:
            region = strength if region is None else strength * region
        new = target if region is None else r + region * (target - r)
        if index is None:
            return new
        return x.index_copy(cdim, index, new)

    def __call__(self, output: Any, layer: str | None = None) -> Any:
        """Edit the first tensor of ``output`` (usable as ``edit_output``)."""
        try:
            return _map_first_tensor(self.apply, output)
        except ValueError as exc:
            raise ValueError(f"layer {layer!r}: {exc}") from None

    def to_json(self) -> dict[str, Any]:
        """A JSON-serializable description; :func:`from_json` rebuilds the object."""
        d: dict[str, Any] = {"type": self.kind}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                d[f.name] = _plain(value)
        return d

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Intervention) and self.to_json() == other.to_json()

    def __repr__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name == "mask":
                m = torch.as_tensor(_plain(value))
                parts.append(f"mask=<{'x'.join(map(str, m.shape))} mask, {m.sum().item():g} on>")
            else:
                parts.append(f"{f.name}={_short(_plain(value))}")
        return f"{type(self).__name__}({', '.join(parts)})"


def _map_first_tensor(fn: Callable[[torch.Tensor], torch.Tensor], output: Any) -> Any:
    """Apply ``fn`` to the first tensor in ``output`` (depth first), keeping the structure."""
    done = False

    def first_only(t: torch.Tensor) -> torch.Tensor:
        nonlocal done
        if done:
            return t
        done = True
        return fn(t)

    result = map_tensors(first_only, output)
    if not done:
        raise ValueError(f"output holds no tensor to edit ({type(output).__name__})")
    return result


@register
@dataclasses.dataclass(eq=False, repr=False)
class Ablate(Intervention):
    """Set ``units`` to zero (inside the region)."""

    def target(self, r: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(r)


@register
@dataclasses.dataclass(eq=False, repr=False)
class Replace(Intervention):
    """Set ``units`` to the constant ``values`` (one per unit, or one for all)."""

    values: float | list[float] = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.values = _floats(self.values, "values")

    def target(self, r: torch.Tensor) -> torch.Tensor:
        return self.per_unit(self.values, r, "values").expand_as(r)


@register
@dataclasses.dataclass(eq=False, repr=False)
class Scale(Intervention):
    """Multiply ``units`` by ``factor`` (one per unit, or one for all)."""

    factor: float | list[float] = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.factor = _floats(self.factor, "factor")

    def target(self, r: torch.Tensor) -> torch.Tensor:
        return r * self.per_unit(self.factor, r, "factor")


@register
@dataclasses.dataclass(eq=False, repr=False)
class AddDirection(Intervention):
    """Add ``scale * direction`` along the channel dimension (``direction``: one value per unit)."""

    direction: list[float] | None = None
    scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.direction is None:
            raise ValueError("AddDirection needs a direction (one value per unit)")
        self.direction = _floats(self.direction, "direction")
        if not isinstance(self.direction, list):
            self.direction = [self.direction]
        self.scale = float(self.scale)

    def target(self, r: torch.Tensor) -> torch.Tensor:
        return r + self.scale * self.per_unit(self.direction, r, "direction")


def _alpha(alpha: Any) -> torch.Tensor | float | list[float]:
    """Validate the strength(s) ``a`` in [0, 1] (a tensor is kept, see the module doc)."""
    values = _tensor_or_floats(alpha, "alpha")
    if isinstance(values, torch.Tensor):
        check = values.detach()
        bad = bool(((check < 0) | (check > 1) | check.isnan()).any())
        shown = _short(_plain(values))
    else:
        bad = any(not 0.0 <= v <= 1.0 for v in (values if isinstance(values, list) else [values]))
        shown = _short(values)
    if bad:
        raise ValueError(f"alpha must lie in [0, 1], got {shown}")
    return values


@register
@dataclasses.dataclass(eq=False, repr=False)
class PartialAblate(Intervention):
    """GAN Dissection's partial ablation: ``(1 - a p) r``, strength ``a`` in [0, 1] per unit
    (``p``: the region)."""

    alpha: Any = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.alpha = _alpha(self.alpha)

    def target(self, r: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(r)

    def strength(self, r: torch.Tensor) -> torch.Tensor:
        return self.per_unit(self.alpha, r, "alpha")


@register
@dataclasses.dataclass(eq=False, repr=False)
class PartialInsert(Intervention):
    """GAN Dissection's partial insertion: ``(1 - a p) r + a p k`` per unit (``k`` the
    ``values``, ``p`` the region)."""

    values: Any = 0.0
    alpha: Any = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.values = _tensor_or_floats(self.values, "values")
        self.alpha = _alpha(self.alpha)

    def target(self, r: torch.Tensor) -> torch.Tensor:
        return self.per_unit(self.values, r, "values").expand_as(r)

    def strength(self, r: torch.Tensor) -> torch.Tensor:
        return self.per_unit(self.alpha, r, "alpha")
