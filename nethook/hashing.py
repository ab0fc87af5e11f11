"""Content hashes: what a result was computed from, as a short stable string.

Cache keys, store attributes and edit hashes all use these. A hash changes when the
content changes (a retrained weight, a different layer, another sample count) and
stays the same across processes, machines and dict orderings. Two functions:

- :func:`hash_model` hashes a module's architecture (module paths and classes) and
  every parameter and buffer (name, dtype, shape, bytes).
- :func:`content_key` hashes named parts of any supported kind: ``None``, ``bool``,
  ``int``, ``float``, ``str``, ``bytes``, paths, torch dtypes/devices, numpy arrays
  and scalars, tensors, modules, stats (by their state), objects with a
  ``fingerprint()`` method (concept sources), and lists/tuples/dicts of these.
  Types are tagged, so ``1``, ``1.0``, ``True`` and ``"1"`` all hash differently.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["content_key", "hash_model"]


def hash_model(model: torch.nn.Module) -> str:
    """Return a hex SHA-256 of ``model``'s architecture, parameters and buffers.

    Covers every submodule's path and class, and every parameter and buffer
    (persistent or not) by name, dtype, shape and content, in registration order.
    Device and ``requires_grad`` do not matter; a changed weight always does.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"hash_model expects a torch.nn.Module, got {type(model).__name__}")
    h = hashlib.sha256(b"nethook.model.v1\0")
    for name, module in model.named_modules():
        cls = type(module)
        _write_str(h, f"module:{name}:{cls.__module__}.{cls.__qualname__}")
    tensors = [("param", n, p) for n, p in model.named_parameters()]
    tensors += [("buffer", n, b) for n, b in model.named_buffers()]
    for kind, name, tensor in tensors:
        _write_str(h, f"{kind}:{name}")
        _write_tensor(h, tensor)
    return h.hexdigest()


def content_key(**parts: Any) -> str:
    """Return a hex SHA-256 of the named ``parts`` (order of keywords is irrelevant).

    Example: ``content_key(model=hash_model(net), layer="layer3", samples=1000)``.
    An unsupported part raises ``TypeError`` naming it.
    """
    h = hashlib.sha256(b"nethook.key.v1\0")
    _write_value(h, dict(parts), "content_key")
    return h.hexdigest()


def _write_str(h, s: str) -> None:
    data = s.encode("utf-8")
    h.update(struct.pack("<Q", len(data)))
    h.update(data)


def _write_tensor(h, t: torch.Tensor) -> None:
    t = t.detach()
    _write_str(h, f"{t.dtype}:{tuple(t.shape)}")
    if t.is_complex():
        t = torch.view_as_real(t)
    data = t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
    h.update(struct.pack("<Q", data.size))
    h.update(data)


def _write_array(h, a: np.ndarray, where: str) -> None:
    if a.dtype.hasobject:
        raise TypeError(f"{where}: cannot hash a numpy array of dtype object")
    a = np.ascontiguousarray(a)
    dtype = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
    a = a.astype(dtype, copy=False)
    _write_str(h, f"{a.dtype.str}:{a.shape}")
    h.update(struct.pack("<Q", a.nbytes))
    h.update(a.reshape(-1).view(np.uint8) if a.size else b"")


def _write_value(h, value: Any, where: str) -> None:
    """Feed a tagged, length-prefixed encoding of ``value`` into ``h``."""
    from nethook.stats.base import Stat

    if value is None:
        h.update(b"N")
    elif isinstance(value, bool | np.bool_):
        h.update(b"B1" if value else b"B0")
    elif isinstance(value, int | np.integer):
        h.update(b"I")
        _write_str(h, str(int(value)))
    elif isinstance(value, float | np.floating):
        h.update(b"F")
        value = float(value)
        _write_str(h, "nan" if math.isnan(value) else value.hex())
    elif isinstance(value, str):
        h.update(b"S")
        _write_str(h, value)
    elif isinstance(value, bytes):
        h.update(b"Y" + struct.pack("<Q", len(value)))
        h.update(value)
    elif isinstance(value, os.PathLike):
        h.update(b"P")
        _write_str(h, os.fspath(value))
    elif isinstance(value, torch.dtype | torch.device):
        h.update(b"D")
        _write_str(h, str(value))
    elif isinstance(value, torch.nn.Module):
        h.update(b"M")
        _write_str(h, hash_model(value))
    elif isinstance(value, torch.Tensor):
        h.update(b"T")
        _write_tensor(h, value)
    elif isinstance(value, np.ndarray):
        h.update(b"A")
        _write_array(h, value, where)
    elif isinstance(value, Stat):
        h.update(b"X")
        _write_value(h, value.state_dict(), where)
    elif callable(getattr(value, "fingerprint", None)):
        h.update(b"G")
        _write_str(h, f"{type(value).__qualname__}:{value.fingerprint()}")
    elif isinstance(value, Mapping):
        h.update(b"{" + struct.pack("<Q", len(value)))
        for key in sorted(value, key=_key_order(where)):
            _write_value(h, key, where)
            _write_value(h, value[key], f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        h.update((b"L" if isinstance(value, list) else b"U") + struct.pack("<Q", len(value)))
        for i, item in enumerate(value):
            _write_value(h, item, f"{where}[{i}]")
    else:
        raise TypeError(
            f"{where}: cannot hash a {type(value).__name__}; expected None, bool, int, "
            "float, str, bytes, path, dtype, tensor, array, module, stat, an object with "
            "fingerprint(), or a list/tuple/dict of these"
        )


def _key_order(where: str):
    def order(key: Any) -> tuple[str, str]:
        if not isinstance(key, str | int):
            raise TypeError(f"{where}: dict keys must be str or int, got {type(key).__name__}")
        return (type(key).__name__, str(key))

    return order
