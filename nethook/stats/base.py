"""The one protocol every statistic follows, and the registry that rebuilds them.

A stat is a small object with ``update(x)``, ``merge(other)``, ``state_dict()``,
``load_state_dict(sd)``, ``to(device)`` and ``to_xarray()``. ``state_dict()`` returns
plain data only: a dict whose leaves are numpy arrays or Python scalars/strings
(``bool``, ``int``, ``float``, ``str``), nested dicts with string keys allowed, always
with the keys ``"class"`` (the registered class name) and ``"version"`` (the format
version). No pickle is ever needed to save or load one (see ``nethook.stats.persist``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

_REGISTRY: dict[str, type[Stat]] = {}


class Stat:
    """Base class of all streaming statistics.

    Public subclasses are registered by class name when defined, so
    :func:`from_state_dict` can rebuild any of them (names starting with ``_`` are
    private helpers and are not registered). Set ``version`` to the format version of
    ``state_dict()``; loading a state of a newer version is refused.
    """

    version: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_"):
            _REGISTRY[cls.__name__] = cls

    def update(self, x: torch.Tensor, *args, **kwargs) -> None:
        """Add a batch of data (``[N, C]`` unless the stat says otherwise)."""
        raise NotImplementedError

    def merge(self, other: Stat) -> None:
        """Fold ``other`` (same kind and shape) into this stat, in place."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Return the plain-data state (see module docstring)."""
        raise NotImplementedError

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore the state produced by :meth:`state_dict`."""
        raise NotImplementedError

    def to(self, device: torch.device | str) -> Stat:
        """Move internal tensors to ``device``; return ``self``."""
        raise NotImplementedError

    def to_xarray(self, units: Sequence | None = None):
        """Return the results as an ``xarray.Dataset`` with named dims (``unit``, ...)."""
        raise NotImplementedError(f"{type(self).__name__} has no xarray view")

    def _header(self) -> dict[str, Any]:
        return {"class": type(self).__name__, "version": type(self).version}

    def _check_merge(self, other: Stat, *fields: str) -> None:
        """Raise unless ``other`` is the same kind and agrees on every named field.

        A field whose value is ``None`` on either side (e.g. the channel count of a
        stat that has seen no data yet) is not compared.
        """
        if type(other) is not type(self):
            raise TypeError(
                f"cannot merge {type(other).__name__} into {type(self).__name__}: "
                "stats must be of the same kind"
            )
        for field in fields:
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine is None or theirs is None:
                continue
            if not _same(mine, theirs):
                name = type(self).__name__
                raise ValueError(
                    f"cannot merge {name} with {field}={_show(theirs)} into {name} "
                    f"with {field}={_show(mine)}"
                )

    def _check_header(self, sd: dict[str, Any]) -> None:
        check_header(sd, type(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        a, b = torch.as_tensor(a).cpu(), torch.as_tensor(b).cpu()
        return a.shape == b.shape and bool(torch.equal(a, b.to(a.dtype)))
    return a == b


def _show(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)}" if value.numel() > 8 else str(value.tolist())
    return repr(value)


def check_header(sd: dict[str, Any], cls: type[Stat]) -> None:
    """Raise unless ``sd`` is a state of ``cls`` with a version this code can read."""
    name = sd.get("class")
    if name is not None:
        name = str(np.asarray(name))
    if name != cls.__name__:
        raise ValueError(f"state_dict is of class {name!r}, expected {cls.__name__!r}")
    version = int(np.asarray(sd.get("version", 0)))
    if version > cls.version:
        raise ValueError(
            f"state_dict of {cls.__name__} has format version {version}, newer than "
            f"version {cls.version} that this nethook reads; upgrade nethook"
        )


def stat_class(name: str) -> type[Stat]:
    """Return the registered stat class called ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown stat class {name!r}; known: {known}") from None


def from_state_dict(sd: dict[str, Any]) -> Stat:
    """Rebuild any registered stat from its ``state_dict()``."""
    if "class" not in sd:
        raise ValueError("state_dict has no 'class' entry; not a nethook stat state")
    cls = stat_class(str(np.asarray(sd["class"])))
    check_header(sd, cls)
    stat = cls.__new__(cls)
    stat.load_state_dict(sd)
    return stat


def flatten(x: torch.Tensor, channel_dim: int | None = None) -> torch.Tensor:
    """Reshape activations to ``[samples, channels]``.

    ``[N, C]`` is returned as is; ``[B, T, C]`` (tokens, channels last) becomes
    ``[B*T, C]``; ``[B, C, *spatial]`` (rank 4 or more, channels at dim 1) becomes
    ``[B*H*W..., C]``. Pass ``channel_dim`` to override the convention (e.g. ``1`` for
    a ``[B, C, L]`` conv1d output).
    """
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.ndim < 2:
        raise ValueError(f"expected activations of rank >= 2, got shape {tuple(x.shape)}")
    if channel_dim is None:
        channel_dim = 1 if x.ndim >= 4 else x.ndim - 1
    channel_dim = channel_dim % x.ndim
    if channel_dim != x.ndim - 1:
        x = x.movedim(channel_dim, -1)
    return x.reshape(-1, x.shape[-1])


def check_batch(x: torch.Tensor, channels: int | None, name: str) -> torch.Tensor:
    """Validate a ``[N, C]`` batch for stat ``name``; return it as a tensor."""
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.ndim != 2:
        raise ValueError(
            f"{name}.update expects a [N, C] batch (use nethook.stats.flatten), "
            f"got shape {tuple(x.shape)}"
        )
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} has {channels} channels, got a batch with {x.shape[1]}")
    return x


def to_numpy(t: torch.Tensor | np.ndarray) -> np.ndarray:
    """Return a CPU numpy copy of a tensor (for ``state_dict``)."""
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().numpy().copy()
    return np.array(t, copy=True)


def as_numpy(t: torch.Tensor | np.ndarray) -> np.ndarray:
    """A tensor's data as a numpy array (a view for CPU tensors; arrays pass through)."""
    return t if isinstance(t, np.ndarray) else t.detach().cpu().numpy()


def as_tensor(a: Any, device: torch.device | str | None = None) -> torch.Tensor:
    """Return a state array (from ``state_dict``) as a tensor on ``device``, copied."""
    return torch.tensor(np.asarray(a), device=device)


def xr_units(units: Sequence | None, n: int, dim: str = "unit") -> dict[str, Any]:
    """Coordinates for a channel dim: the given labels, or ``0..n-1``."""
    if units is None:
        return {dim: np.arange(n)}
    units = list(units)
    if len(units) != n:
        raise ValueError(f"expected {n} unit labels for dim {dim!r}, got {len(units)}")
    return {dim: units}


def states_equal(a: Any, b: Any) -> bool:
    """Whether two ``state_dict()`` trees are identical: same keys, same scalar types
    and values, arrays equal in dtype, shape and content (NaN equal to NaN)."""
    if isinstance(a, dict) or isinstance(b, dict):
        if not (isinstance(a, dict) and isinstance(b, dict)) or set(a) != set(b):
            return False
        return all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray | np.generic) or isinstance(b, np.ndarray | np.generic):
        x, y = np.asarray(a), np.asarray(b)
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        return bool(np.array_equal(x, y, equal_nan=x.dtype.kind in "fc"))
    if type(a) is not type(b):
        return False
    return a == b or (isinstance(a, float) and a != a and b != b)
