"""Save and load any stat to a Zarr v3 group or an ``.npz`` file, and cache it by key.

A stat's ``state_dict()`` (nested dicts of numpy arrays and Python scalars) is
flattened to ``/``-joined paths. Numeric and boolean arrays are stored as arrays
(Zarr arrays at those paths, so the group is browsable; ``.npz`` members); scalars,
string arrays and the nesting of dicts go into a JSON manifest (the Zarr group's
``nethook`` attribute; the ``.npz`` member ``__nethook__``) together with the
optional cache ``key`` and user ``attrs``. Loading never unpickles anything.

Writes to a path are atomic: the file or directory is written under a temporary name
next to the target and renamed into place, so a reader sees the old complete result,
the new complete result, or nothing.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from nethook.atomic import atomic_dir, atomic_path
from nethook.stats.base import Stat, from_state_dict

__all__ = ["cached", "load", "load_zarr_group", "read_attrs", "read_key", "save", "save_zarr_group"]

FORMAT = 1
_MANIFEST = "__nethook__"


def _unreadable_errors() -> tuple[type[BaseException], ...]:
    """What reading a damaged or foreign file raises (a cache miss, not a failure)."""
    from zarr.errors import BaseZarrError

    return (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, BaseZarrError)


def save(
    stat: Stat,
    path: str | os.PathLike,
    *,
    key: str | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``stat`` to ``path`` atomically: ``.npz`` if the name ends so, else a Zarr v3
    directory (conventionally ``*.zarr``). ``key`` (see :func:`cached`) and JSON-able
    ``attrs`` (model, layer, source, ...) are stored alongside. Returns the path."""
    path = Path(path)
    state = stat.state_dict()
    if _is_npz(path):
        with atomic_path(path, suffix=".npz", fsync=True) as tmp:
            _write_npz(tmp, state, key, attrs)
        return path
    import zarr

    with atomic_dir(path) as tmp:
        group = zarr.open_group(store=str(tmp), mode="w", zarr_format=3)
        save_zarr_group(stat, group, key=key, attrs=attrs, state=state)
    return path


def load(path: str | os.PathLike) -> Stat:
    """Read a stat written by :func:`save` (``.npz`` or Zarr directory)."""
    state, _ = _read(Path(path))
    return from_state_dict(state)


def read_key(path: str | os.PathLike) -> str | None:
    """The ``key`` stored with a saved stat (``None`` if it was saved without one)."""
    return _read_manifest(Path(path)).get("key")


def read_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """The ``attrs`` stored with a saved stat."""
    return dict(_read_manifest(Path(path)).get("attrs") or {})


def cached(
    path: str | os.PathLike,
    key: str,
    compute: Callable[[], Stat],
    *,
    attrs: Mapping[str, Any] | None = None,
) -> Stat:
    """Return the stat saved at ``path`` if it was saved under ``key``; else compute it.

    ``key`` should be a content hash of everything the result depends on, e.g.
    ``nethook.hashing.content_key(model=hash_model(net), layer=..., source=...,
    samples=..., seed=..., dtype=...)``, so a changed model or setting never reuses a
    stale result. On a miss (no file, another key, an unreadable file) ``compute()``
    runs and its result is saved atomically under ``key`` before being returned.
    """
    if not isinstance(key, str):
        raise TypeError(
            f"cached key must be a str (e.g. from content_key), got {type(key).__name__}"
        )
    path = Path(path)
    if path.exists():
        try:
            state, manifest = _read(path)
            if manifest.get("key") == key:
                return from_state_dict(state)
        except _unreadable_errors():
            pass
    stat = compute()
    if not isinstance(stat, Stat):
        raise TypeError(f"cached compute() must return a Stat, got {type(stat).__name__}")
    save(stat, path, key=key, attrs=attrs)
    return stat


def save_zarr_group(
    stat: Stat,
    group,
    *,
    key: str | None = None,
    attrs: Mapping[str, Any] | None = None,
    state: dict[str, Any] | None = None,
) -> None:
    """Write ``stat`` into an open, empty Zarr v3 ``group`` (not atomic by itself:
    :func:`save` wraps it). Arrays go to their ``/``-joined state paths."""
    state = stat.state_dict() if state is None else state
    arrays, manifest = _encode(state, key, attrs)
    for name, array in arrays.items():
        group.create_array(name, data=array)
    group.attrs["nethook"] = manifest


def load_zarr_group(group) -> Stat:
    """Rebuild the stat stored in a Zarr group by :func:`save_zarr_group`."""
    manifest = _manifest_of_group(group)
    arrays = {name: np.asarray(group[name][...]) for name in manifest["arrays"]}
    return from_state_dict(_decode(arrays, manifest))


def _is_npz(path: Path) -> bool:
    return path.suffix.lower() == ".npz"


def _write_npz(tmp: Path, state: dict[str, Any], key, attrs) -> None:
    arrays, manifest = _encode(state, key, attrs)
    with open(tmp, "wb") as f:
        np.savez(f, **{_MANIFEST: np.array(json.dumps(manifest))}, **arrays)


def _encode(
    state: dict[str, Any], key: str | None, attrs: Mapping[str, Any] | None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Split a nested state into arrays by path and a JSON manifest for the rest."""
    arrays: dict[str, np.ndarray] = {}
    scalars: dict[str, list] = {}
    dicts: list[str] = []

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        dicts.append(prefix)
        for name, value in node.items():
            if not isinstance(name, str) or not name or "/" in name or name == _MANIFEST:
                raise ValueError(
                    f"state key {name!r} at {prefix or '/'!r}: keys must be non-empty str without '/'"
                )
            where = f"{prefix}/{name}" if prefix else name
            if isinstance(value, Mapping):
                walk(value, where)
            elif isinstance(value, bool | int | float | str):
                scalars[where] = [
                    type(value).__name__,
                    repr(value) if isinstance(value, float) else value,
                ]
            elif isinstance(value, np.ndarray | np.generic):
                value = np.asarray(value)
                if value.dtype.kind in "US":
                    scalars[where] = [
                        "strings",
                        value.dtype.str,
                        list(value.shape),
                        value.ravel().tolist(),
                    ]
                elif value.dtype.hasobject:
                    raise ValueError(f"state entry {where!r} is an object array; not storable")
                else:
                    arrays[where] = value
            else:
                raise ValueError(
                    f"state entry {where!r} is a {type(value).__name__}; expected a numpy "
                    "array, bool, int, float, str or dict"
                )

    walk(state, "")
    manifest = {
        "format": FORMAT,
        "key": key,
        "attrs": json.loads(json.dumps(dict(attrs or {}))),
        "arrays": sorted(arrays),
        "scalars": scalars,
        "dicts": dicts,
    }
    return arrays, manifest


def _decode(arrays: Mapping[str, np.ndarray], manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Rebuild the nested state from arrays by path and the manifest."""
    version = int(manifest.get("format", 0))
    if version > FORMAT:
        raise ValueError(
            f"saved stat has storage format version {version}, newer than version {FORMAT} "
            "that this nethook reads; upgrade nethook"
        )
    root: dict[str, Any] = {}

    def node(path: str) -> dict[str, Any]:
        here = root
        for part in path.split("/") if path else []:
            here = here.setdefault(part, {})
        return here

    for path in manifest["dicts"]:
        node(path)
    for path, array in arrays.items():
        parent, _, name = path.rpartition("/")
        node(parent)[name] = np.asarray(array)
    for path, (kind, *value) in manifest["scalars"].items():
        parent, _, name = path.rpartition("/")
        node(parent)[name] = _scalar(kind, value)
    return root


def _scalar(kind: str, value: list) -> Any:
    if kind == "float":
        return float(value[0])
    if kind == "strings":
        dtype, shape, items = value
        return np.array(items, dtype=dtype).reshape(shape)
    return {"bool": bool, "int": int, "str": str}[kind](value[0])


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    if not path.exists():
        raise FileNotFoundError(f"no saved stat at {path}")
    if _is_npz(path):
        with np.load(path, allow_pickle=False) as data:
            manifest = json.loads(str(data[_MANIFEST]))
            arrays = {name: data[name] for name in manifest["arrays"]}
    else:
        import zarr

        group = zarr.open_group(store=str(path), mode="r")
        manifest = _manifest_of_group(group)
        arrays = {name: np.asarray(group[name][...]) for name in manifest["arrays"]}
    return _decode(arrays, manifest), manifest


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"no saved stat at {path}")
    if _is_npz(path):
        with np.load(path, allow_pickle=False) as data:
            return json.loads(str(data[_MANIFEST]))
    import zarr

    return _manifest_of_group(zarr.open_group(store=str(path), mode="r"))


def _manifest_of_group(group) -> dict[str, Any]:
    manifest = group.attrs.get("nethook")
    if not isinstance(manifest, Mapping) or "dicts" not in manifest:
        raise ValueError(f"zarr group {group.store} holds no nethook stat (no 'nethook' attribute)")
    return dict(manifest)
