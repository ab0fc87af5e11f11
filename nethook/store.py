"""The activation store: layer activations in Zarr v3, labelled with xarray, resumable.

Layout of a store (a Zarr v3 group at any path zarr accepts, local or fsspec)::

    zarr.json                  root attrs["nethook"]: the store's identity (model spec,
                               weight hash, layers, source spec and fingerprint, seed,
                               dtype, sample count, block size, nethook version)
    sample                     int64 [sample]: the sample ids (positions in the source)
    manifest                   uint64 [block, 1 + layers]: one chunk (file c.<block>.0)
                               per block, written only after that block's data is
                               durable; column 0 is 1 for a complete block, the others
                               hold a CRC-32C per layer
    layers/<layer>/activations the activations, dims (sample, unit, y, x) for conv
                               outputs, (sample, token, unit) or (sample, unit) otherwise;
                               chunk files c.<block>.0.0.0 (no directory per block)
    layers/<layer>/unit        int64 [unit]: unit indices
    sample_data/<name>         optional per-sample arrays recorded beside the activations
                               (e.g. concept labels, thumbnails), any fixed numpy dtype,
                               dims (sample, <name>_0, ...); same blocks, files and
                               manifest (a CRC per array after the layers' CRCs)

Samples are written in *blocks* (``block_samples`` consecutive samples, one zarr chunk,
or one shard of smaller chunks when ``chunk_samples`` is given). A block is complete
exactly when its manifest chunk exists, so a reader never sees a half-written block and a
killed writer resumes at the first incomplete block and produces the same bytes.

``bfloat16`` has no zarr dtype: such arrays hold the raw bits as ``uint16`` with the attr
``nethook_dtype = "bfloat16"`` and are decoded to float32 when read through this module.
"""

from __future__ import annotations

import errno
import os
import sys
import uuid
import zlib
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
import zarr
from zarr.storage import LocalStore

from nethook.atomic import fsync_file


def _crc32(data: np.ndarray, crc: int = 0) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(data)).cast("B"), crc)


# Checksums continue from ``crc``: a block's checksum over pieces equals the one over all.
CHECKSUMS = {"crc32": _crc32}
try:  # hardware CRC-32C, about 3x zlib's CRC-32 here; zarr's crc32c codec needs it too
    import google_crc32c

    def _crc32c(data: np.ndarray, crc: int = 0) -> int:
        view = np.ascontiguousarray(data).view()
        view.flags.writeable = False
        return int(google_crc32c.extend(crc, view.reshape(-1).view(np.uint8)))

    CHECKSUMS["crc32c"] = _crc32c
    CHECKSUM = "crc32c"
except ImportError:  # pragma: no cover
    CHECKSUM = "crc32"


FORMAT = 1
DTYPES = ("float32", "float16", "bfloat16")
# Fields that must agree before a run may append to an existing store.
IDENTITY_FIELDS = (
    "model",
    "model_hash",
    "layers",
    "source",
    "source_fingerprint",
    "seed",
    "dtype",
    "samples",
    "block_samples",
    "chunk_samples",
    "compressor",
    "sample_data",
)
DEFAULT_BLOCK_BYTES = 64 * 2**20
# Chunk files named c.<block>.0.0.0 side by side: no directory per block to create (and
# directory operations are slow on many file systems).
FLAT_KEYS = {"name": "default", "separator": "."}


class StoreError(RuntimeError):
    """A store cannot be opened, written or read as asked."""


class StoreMismatchError(StoreError):
    """A run tried to append to a store recorded from a different model, layer or source."""


class CorruptBlockError(StoreError):
    """A block's data no longer matches the checksum recorded when it was written."""

    def __init__(self, path: str, layer: str, block: int, start: int, stop: int, why: str):
        self.layer, self.block, self.start, self.stop = layer, block, start, stop
        super().__init__(
            f"store {path}: layer {layer!r} block {block} (samples {start}..{stop - 1}) "
            f"is corrupt: {why}; delete that block with `ActivationStore.invalidate({block})` "
            "and rerun the recording to rewrite it"
        )


def dims_for(sample_shape: Sequence[int]) -> tuple[str, ...]:
    """Dimension names of a layer whose per-sample activation has ``sample_shape``.

    ``[C]`` -> (sample, unit); ``[T, C]`` -> (sample, token, unit) (tokens, channels
    last); ``[C, H, W]`` -> (sample, unit, y, x); ``[C, D, H, W]`` -> (sample, unit, z, y, x).
    """
    names = {
        1: ("unit",),
        2: ("token", "unit"),
        3: ("unit", "y", "x"),
        4: ("unit", "z", "y", "x"),
    }
    if len(sample_shape) not in names:
        raise ValueError(
            f"cannot store activations with per-sample shape {tuple(sample_shape)}: "
            "expected [C], [T, C], [C, H, W] or [C, D, H, W]"
        )
    return ("sample",) + names[len(sample_shape)]


def unit_axis(sample_shape: Sequence[int]) -> int:
    """Axis of the unit dim in the full ``(sample, ...)`` array."""
    return dims_for(sample_shape).index("unit")


def storage_dtype(dtype: str) -> np.dtype:
    """The numpy dtype zarr holds for a nethook storage ``dtype``."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown storage dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)


def to_storage(x: torch.Tensor | np.ndarray, dtype: str) -> np.ndarray:
    """Convert activations to the numpy array zarr stores for ``dtype``.

    The cast runs where the tensor lives (on the GPU for CUDA tensors), so only the
    narrow result crosses to the host.
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    x = x.detach()
    if dtype == "bfloat16":
        bits = x.to(torch.bfloat16).view(torch.int16).cpu().numpy()
        return bits.view(np.uint16)
    return x.to(getattr(torch, dtype)).cpu().numpy()


def from_storage(data: np.ndarray, dtype: str) -> np.ndarray:
    """Decode stored data: bfloat16 bits become float32, other dtypes pass through."""
    if dtype == "bfloat16":
        return (data.astype(np.uint32) << 16).view(np.float32)
    return data


@dataclass(frozen=True)
class LayerInfo:
    """Shape and dims of one stored layer."""

    name: str
    sample_shape: tuple[int, ...]
    dims: tuple[str, ...]


class ActivationStore:
    """A Zarr v3 store of layer activations, written block by block and resumable.

    Make one with :meth:`create` (or :meth:`open_or_create`), open one with :meth:`open`.
    Write complete blocks with :meth:`write_block`; read them with :meth:`read_block`,
    :meth:`layer` (an ``xarray.DataArray``) or :meth:`to_dataset`.
    """

    def __init__(self, group: zarr.Group, path: str, storage_options: dict | None = None):
        self._group = group
        self.path = path
        self.storage_options = storage_options
        self.identity: dict[str, Any] = dict(group.attrs["nethook"])
        self._manifest: zarr.Array = group["manifest"]
        self._pending: list[Future] = []
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._arrays: dict[str, zarr.Array] = {
            name: group[f"layers/{name}/activations"] for name in self.layers
        }
        self._arrays.update({name: group[f"sample_data/{name}"] for name in self.sample_data})

    # ---- opening ---------------------------------------------------------------

    @classmethod
    def open(
        cls, path: str | os.PathLike, mode: str = "r", storage_options: dict | None = None
    ) -> ActivationStore:
        """Open an existing store (``mode="r"`` to read, ``"r+"`` to write blocks)."""
        path = _check_path(path)
        try:
            group = zarr.open_group(path, mode=mode, storage_options=storage_options)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
            raise StoreError(f"no activation store at {path}: {exc}") from None
        if "nethook" not in group.attrs:
            raise StoreError(
                f"{path} is a Zarr group but not a nethook activation store "
                "(its attrs have no 'nethook' entry)"
            )
        try:
            return cls(group, path, storage_options)
        except KeyError as exc:
            raise StoreError(
                f"store {path} is incomplete ({exc} missing); it was killed while being "
                "created: rerun the recording to finish creating it"
            ) from None

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        layers: Mapping[str, Sequence[int]],
        samples: int,
        dtype: str = "float32",
        sample_ids: Sequence[int] | np.ndarray | None = None,
        block_samples: int | None = None,
        chunk_samples: int | None = None,
        compressor: str | None = None,
        attrs: Mapping[str, Any] | None = None,
        storage_options: dict | None = None,
        sample_data: Mapping[str, tuple[Sequence[int], str]] | None = None,
    ) -> ActivationStore:
        """Create a new, empty store (refused if a store already exists at ``path``).

        ``layers`` maps each layer name to its per-sample activation shape (``[C, H, W]``,
        ``[T, C]`` or ``[C]``). ``attrs`` holds the provenance: ``model``, ``model_hash``,
        ``source``, ``source_fingerprint``, ``seed`` (all optional, recorded as given).
        ``block_samples`` defaults to about 64 MiB of the largest layer per block, split
        so blocks are of equal size; with ``chunk_samples`` smaller than a block, blocks
        become shards of such chunks (for cheap random access to single samples). ``compressor`` is ``None`` (fastest: zarr
        writing is CPU-bound), ``"zstd"`` or ``"blosc"``. ``sample_data`` maps names to
        ``(per-sample shape, numpy dtype name)`` of arrays recorded beside the
        activations, block by block (e.g. a concept source's labels, to replay them in a
        second pass without the source).
        """
        path = _check_path(path)
        identity = cls._identity(
            layers=layers,
            samples=samples,
            dtype=dtype,
            block_samples=block_samples,
            chunk_samples=chunk_samples,
            compressor=compressor,
            attrs=attrs or {},
            sample_data=sample_data,
        )
        if sample_ids is None:
            sample_ids = np.arange(samples, dtype=np.int64)
        sample_ids = np.asarray(sample_ids, dtype=np.int64)
        if sample_ids.shape != (samples,):
            raise ValueError(
                f"sample_ids has shape {sample_ids.shape}, expected ({samples},) for "
                f"samples={samples}"
            )
        if "://" not in path and os.path.isdir(path) and os.listdir(path):
            if not os.path.exists(os.path.join(path, "zarr.json")):
                raise StoreError(
                    f"{path} is a non-empty directory that is not a Zarr store; "
                    "refusing to write a store over it"
                )
        existing = _try_open_group(path, storage_options)
        if existing is not None and (len(list(existing.keys())) or existing.attrs):
            if "nethook" in existing.attrs:
                raise StoreError(f"a store already exists at {path}; open it to resume")
            raise StoreError(f"{path} already holds a Zarr group that is not a nethook store")
        try:
            group = zarr.open_group(
                path, mode="w", attributes={"nethook": identity}, storage_options=storage_options
            )
            cls._create_arrays(group, identity, sample_ids)
        except OSError as exc:
            raise _write_error(exc, path, "create the store") from exc
        store = cls(group, path, storage_options)
        store._sync_metadata()
        return store

    @classmethod
    def open_or_create(
        cls,
        path: str | os.PathLike,
        *,
        layers: Mapping[str, Sequence[int]],
        samples: int,
        **options: Any,
    ) -> ActivationStore:
        """Open the store at ``path`` to resume it, or create it if there is none.

        A store that exists must have been made with the same identity (model, weight
        hash, layers, source, fingerprint, seed, dtype, samples, block layout);
        otherwise :class:`StoreMismatchError` says which fields differ.
        """
        path = _check_path(path)
        storage_options = options.get("storage_options")
        group = _try_open_group(path, storage_options, mode="r+")
        if group is None or "nethook" not in group.attrs:
            if group is not None and len(list(group.keys())):
                raise StoreError(f"{path} already holds a Zarr group that is not a nethook store")
            return cls.create(path, layers=layers, samples=samples, **options)
        wanted = cls._identity(
            layers=layers,
            samples=samples,
            dtype=options.get("dtype", "float32"),
            block_samples=options.get("block_samples"),
            chunk_samples=options.get("chunk_samples"),
            compressor=options.get("compressor"),
            attrs=options.get("attrs") or {},
            sample_data=options.get("sample_data"),
        )
        have = dict(group.attrs["nethook"])
        check_identity(path, have, wanted, auto_block=options.get("block_samples") is None)
        sample_ids = options.get("sample_ids")
        sample_ids = (
            np.arange(samples, dtype=np.int64)
            if sample_ids is None
            else np.asarray(sample_ids, np.int64)
        )
        cls._create_arrays(group, have, sample_ids, missing_only=True)
        store = cls(group, path, storage_options)
        store._remove_partial_files()
        return store

    @staticmethod
    def _identity(
        *,
        layers: Mapping[str, Sequence[int]],
        samples: int,
        dtype: str,
        block_samples: int | None,
        chunk_samples: int | None,
        compressor: str | None,
        attrs: Mapping[str, Any],
        sample_data: Mapping[str, tuple[Sequence[int], str]] | None = None,
    ) -> dict[str, Any]:
        from nethook import __version__

        if not layers:
            raise ValueError("layers is empty: name at least one layer to store")
        if int(samples) < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        itemsize = storage_dtype(dtype).itemsize
        shapes = {str(k): [int(d) for d in v] for k, v in layers.items()}
        for name, shape in shapes.items():
            dims_for(shape)
            if "/" in name or name.startswith("__"):
                raise ValueError(f"layer name {name!r} cannot be a Zarr node name")
        extra = _sample_data_spec(sample_data or {}, shapes)
        largest = max(int(np.prod(s)) for s in shapes.values()) * itemsize
        if block_samples is None:  # about DEFAULT_BLOCK_BYTES, blocks of equal size
            target = max(1, DEFAULT_BLOCK_BYTES // max(largest, 1))
            block_samples = -(-samples // -(-samples // target))
        block_samples = int(min(block_samples, samples))
        if block_samples < 1:
            raise ValueError(f"block_samples must be >= 1, got {block_samples}")
        if chunk_samples is not None:
            chunk_samples = int(chunk_samples)
            if chunk_samples < 1:
                raise ValueError(f"chunk_samples must be >= 1, got {chunk_samples}")
            chunk_samples = min(chunk_samples, block_samples)
            block_samples -= block_samples % chunk_samples
            if chunk_samples == block_samples:
                chunk_samples = None
        if compressor not in (None, "zstd", "blosc"):
            raise ValueError(f"unknown compressor {compressor!r}; expected None, 'zstd' or 'blosc'")
        return {
            "format": FORMAT,
            "nethook_version": __version__,
            "model": attrs.get("model"),
            "model_hash": attrs.get("model_hash"),
            "layers": list(shapes),
            "shapes": shapes,
            "source": attrs.get("source"),
            "source_fingerprint": attrs.get("source_fingerprint"),
            "seed": attrs.get("seed"),
            "dtype": dtype,
            "samples": int(samples),
            "block_samples": block_samples,
            "chunk_samples": chunk_samples,
            "compressor": compressor,
            "checksum": CHECKSUM,
            **({"sample_data": extra} if extra else {}),
            **{k: v for k, v in attrs.items() if k not in IDENTITY_FIELDS},
        }

    @staticmethod
    def _create_arrays(
        group: zarr.Group,
        identity: Mapping[str, Any],
        sample_ids: np.ndarray,
        missing_only: bool = False,
    ) -> None:
        """Create the sample, manifest and layer arrays (only missing ones on resume)."""
        n, block = identity["samples"], identity["block_samples"]
        n_blocks = -(-n // block)
        existing = _array_paths(group)

        def want(name: str) -> bool:
            return not (missing_only and name in existing)

        if want("sample"):
            group.create_array(
                "sample",
                shape=(n,),
                chunks=(n,),
                dtype="int64",
                dimension_names=["sample"],
                compressors=None,
                overwrite=True,
            )
        group["sample"][:] = sample_ids  # idempotent: also repairs a killed creation
        columns = 1 + len(identity["layers"]) + len(identity.get("sample_data") or {})
        if want("manifest"):
            group.create_array(
                "manifest",
                shape=(n_blocks, columns),
                chunks=(1, columns),
                dtype="uint64",
                fill_value=0,
                dimension_names=["block", "field"],
                compressors=None,
                chunk_key_encoding=FLAT_KEYS,
                overwrite=True,
            )
        stored = storage_dtype(identity["dtype"])
        compressors = _compressors(identity["compressor"])
        for name in identity["layers"]:
            shape = tuple(identity["shapes"][name])
            dims = dims_for(shape)
            if want(f"layers/{name}/activations"):
                chunk = identity["chunk_samples"]
                group.create_array(
                    f"layers/{name}/activations",
                    shape=(n,) + shape,
                    chunks=((chunk or block),) + shape,
                    shards=((block,) + shape) if chunk else None,
                    dtype=stored,
                    fill_value=0,
                    compressors=compressors,
                    dimension_names=list(dims),
                    attributes={"nethook_dtype": identity["dtype"], "layer": name},
                    chunk_key_encoding=FLAT_KEYS,
                    overwrite=True,
                )
            units = shape[dims.index("unit") - 1]
            if want(f"layers/{name}/unit"):
                group.create_array(
                    f"layers/{name}/unit",
                    shape=(units,),
                    chunks=(units,),
                    dtype="int64",
                    dimension_names=["unit"],
                    compressors=None,
                    overwrite=True,
                )
            group[f"layers/{name}/unit"][:] = np.arange(units)
        for name, spec in (identity.get("sample_data") or {}).items():
            if want(f"sample_data/{name}"):
                shape = tuple(spec["shape"])
                group.create_array(
                    f"sample_data/{name}",
                    shape=(n,) + shape,
                    chunks=(block,) + shape,
                    dtype=spec["dtype"],
                    fill_value=0,
                    compressors=None,
                    dimension_names=["sample", *(f"{name}_{k}" for k in range(len(shape)))],
                    chunk_key_encoding=FLAT_KEYS,
                    overwrite=True,
                )

    # ---- what the store holds --------------------------------------------------

    @property
    def layers(self) -> list[str]:
        """Names of the stored layers, in recording order."""
        return list(self.identity["layers"])

    @property
    def sample_data(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Per-sample data arrays recorded beside the activations: name -> (shape, dtype)."""
        return {
            name: (tuple(spec["shape"]), np.dtype(spec["dtype"]))
            for name, spec in (self.identity.get("sample_data") or {}).items()
        }

    @property
    def fields(self) -> list[str]:
        """Everything a block holds: the layers, then the sample data arrays."""
        return self.layers + list(self.sample_data)

    def field_layout(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        """Per-sample shape and stored dtype of a layer or sample data array."""
        if name in self.identity["shapes"]:
            return tuple(self.identity["shapes"][name]), storage_dtype(self.dtype)
        if name in self.sample_data:
            return self.sample_data[name]
        raise KeyError(f"{name!r} is not in store {self.path}; it holds {', '.join(self.fields)}")

    @property
    def samples(self) -> int:
        """Number of samples the store holds when complete."""
        return int(self.identity["samples"])

    @property
    def dtype(self) -> str:
        """Storage dtype: float32, float16 or bfloat16."""
        return str(self.identity["dtype"])

    @property
    def block_samples(self) -> int:
        """Samples per block (the unit of writing, resuming and checksumming)."""
        return int(self.identity["block_samples"])

    @property
    def n_blocks(self) -> int:
        """Number of blocks in the complete store."""
        return -(-self.samples // self.block_samples)

    def layer_info(self, layer: str) -> LayerInfo:
        """Shape and dims of ``layer``."""
        self._check_layer(layer)
        shape = tuple(self.identity["shapes"][layer])
        return LayerInfo(layer, shape, dims_for(shape))

    def block_range(self, block: int) -> tuple[int, int]:
        """``(start, stop)`` sample positions covered by ``block``."""
        if not 0 <= block < self.n_blocks:
            raise IndexError(f"block {block} out of range: the store has {self.n_blocks} blocks")
        start = block * self.block_samples
        return start, min(start + self.block_samples, self.samples)

    def sample_ids(self) -> np.ndarray:
        """Sample ids of all positions (complete or not)."""
        return np.asarray(self._group["sample"][:])

    def completed_blocks(self) -> np.ndarray:
        """Sorted indices of the blocks whose manifest entry says they are complete."""
        return np.flatnonzero(self._manifest_rows()[:, 0] == 1)

    def missing_blocks(self) -> np.ndarray:
        """Sorted indices of the blocks not yet complete."""
        return np.flatnonzero(self._manifest_rows()[:, 0] != 1)

    def is_complete(self) -> bool:
        """True when every block is written."""
        return len(self.missing_blocks()) == 0

    def completed_samples(self) -> np.ndarray:
        """Positions of the samples in complete blocks."""
        parts = [np.arange(*self.block_range(int(b))) for b in self.completed_blocks()]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def _checksum(self, data: np.ndarray, crc: int = 0) -> int:
        name = self.identity.get("checksum", "crc32")
        if name not in CHECKSUMS:
            raise StoreError(
                f"store {self.path} uses checksum {name!r}, which needs a package not "
                "installed here (google-crc32c)"
            )
        return CHECKSUMS[name](data, crc)

    def _manifest_rows(self) -> np.ndarray:
        return np.asarray(self._manifest[:])

    def _check_layer(self, layer: str) -> None:
        if layer not in self.identity["shapes"]:
            raise KeyError(
                f"layer {layer!r} is not in store {self.path}; it holds {', '.join(self.layers)}"
            )

    # ---- writing ---------------------------------------------------------------

    def write_block(
        self, block: int, data: Mapping[str, np.ndarray], *, background: bool = False
    ) -> None:
        """Write one whole block (every layer) and then mark it complete.

        ``data[layer]`` is ``[stop - start, *sample_shape]`` already in the storage
        dtype (see :func:`to_storage`). The manifest entry is written only after every
        chunk is written and, on a local disk, fsynced; so a crash at any moment leaves
        the block either complete or absent from the manifest. Checksums are computed
        alongside the writes (both release the GIL). With ``background`` the fsyncs and
        the manifest entry happen in a thread while the caller goes on (the disk
        flushes block k while block k+1 is written); :meth:`flush` waits for them.
        """
        self._raise_background_error()
        start, stop = self.block_range(block)
        if set(data) != set(self.fields):
            raise ValueError(
                f"write_block needs every layer and sample data array of the store "
                f"({', '.join(self.fields)}), got {', '.join(data)}"
            )
        arrays = []
        for layer in self.fields:
            values = np.ascontiguousarray(data[layer])
            shape, stored = self.field_layout(layer)
            expected = (stop - start, *shape)
            if values.shape != expected or values.dtype != stored:
                raise ValueError(
                    f"block {block} of layer {layer!r}: got {values.dtype}{list(values.shape)}, "
                    f"expected {stored}{list(expected)}"
                )
            arrays.append(values)
        pool = self._pool()
        crcs = [pool.submit(self._checksum, values) for values in arrays]
        paths = []
        try:
            for layer, values in zip(self.fields, arrays, strict=True):
                paths.append(self._write_chunk(self._arrays[layer], block, values))
        except OSError as exc:
            raise _write_error(exc, self.path, f"write samples {start}..{stop - 1}") from exc
        finally:
            row = np.array([1] + [f.result() for f in crcs], np.uint64)
        self._complete(block, paths, row, background)

    def can_stream(self) -> bool:
        """True when blocks can be written piece by piece (:meth:`stream_block`)."""
        return all(
            self._direct_chunk_path(self._arrays[name], 0) is not None for name in self.fields
        )

    def stream_block(self, block: int) -> BlockStream:
        """Start writing ``block`` piece by piece, straight to its chunk files.

        Only for layouts where :meth:`can_stream` (plain local chunks): it saves the
        copy into a block buffer that :meth:`write_block` needs when batches and blocks
        do not line up. Append every layer's samples in order, then ``commit()``.
        """
        if not self.can_stream():
            raise StoreError(f"store {self.path}: blocks of this layout cannot be streamed")
        self.block_range(block)
        return BlockStream(self, block)

    def _complete(
        self, block: int, paths: list[Path | None], row: np.ndarray, background: bool
    ) -> None:
        finish = self._pool("sync").submit(self._finish_block, block, paths, row)
        self._pending.append(finish)
        while len(self._pending) > (2 if background else 0):
            self._pending.pop(0).result()

    def flush(self) -> None:
        """Wait until every block written in the background is durable and marked complete."""
        while self._pending:
            self._pending.pop(0).result()

    def _raise_background_error(self) -> None:
        done = [f for f in self._pending if f.done()]
        for f in done:
            self._pending.remove(f)
            f.result()

    def _finish_block(self, block: int, paths: list[Path | None], row: np.ndarray) -> None:
        """fsync a block's chunks, then write (and fsync) its manifest entry."""
        try:
            self._sync_paths(paths)
            manifest = self._direct_chunk_path(self._manifest, block)
            if manifest is None:
                self._manifest[block : block + 1] = row[None]
            else:
                _write_file(manifest, row[None], sync=True)
        except OSError as exc:
            raise _write_error(exc, self.path, f"finish block {block}") from exc

    def _pool(self, kind: str = "crc") -> ThreadPoolExecutor:
        """One worker thread per kind: checksums, and (ordered) block completion."""
        if kind not in self._pools:
            self._pools[kind] = ThreadPoolExecutor(1, thread_name_prefix=f"nethook-store-{kind}")
        return self._pools[kind]

    def _write_chunk(self, arr: zarr.Array, block: int, values: np.ndarray) -> Path | None:
        """Write one block of ``arr``; return the chunk file to fsync (None if not local).

        An uncompressed, unsharded chunk on a local disk is, by the Zarr v3 spec, the
        block's raw little-endian bytes (edge chunks padded with the fill value), so it
        is written straight to its file (temp name, then rename): zarr's encode pipeline
        is CPU-bound here and costs more than the disk. Other layouts go through zarr.
        """
        path = self._direct_chunk_path(arr, block)
        if path is None:
            start = block * arr.chunks[0] if arr.shards is None else block * arr.shards[0]
            arr[start : start + values.shape[0]] = values
            return self._chunk_path(arr, (block,) + (0,) * (arr.ndim - 1))
        if values.shape[0] < arr.chunks[0]:
            padded = np.zeros((arr.chunks[0], *values.shape[1:]), values.dtype)
            padded[: values.shape[0]] = values
            values = padded
        _write_file(path, values, sync=False)
        return path

    def _direct_chunk_path(self, arr: zarr.Array, block: int) -> Path | None:
        from zarr.codecs import BytesCodec

        codecs = arr.metadata.codecs
        plain = (
            sys.byteorder == "little"
            and len(codecs) == 1
            and isinstance(codecs[0], BytesCodec)
            and codecs[0].endian is not None
            and codecs[0].endian.value == "little"
            and arr.shards is None
        )
        if not plain:
            return None
        return self._chunk_path(arr, (block,) + (0,) * (arr.ndim - 1))

    def invalidate(self, block: int) -> None:
        """Mark ``block`` incomplete, so the next recording run rewrites it."""
        self.block_range(block)
        self._manifest[block : block + 1] = np.zeros((1, 1 + len(self.fields)), np.uint64)

    # ---- reading ---------------------------------------------------------------

    def read_block(
        self, layer: str, block: int, *, verify: bool = True, decode: bool = True
    ) -> np.ndarray:
        """Return ``[block samples, *sample_shape]`` of ``layer``; refuse incomplete blocks.

        ``layer`` may also name a sample data array (returned in its own dtype). With
        ``verify`` the data's checksum is compared with the manifest and a
        :class:`CorruptBlockError` names the layer, block and sample range on mismatch.
        ``decode`` turns bfloat16 bits into float32.
        """
        shape, _ = self.field_layout(layer)
        start, stop = self.block_range(block)
        row = np.asarray(self._manifest[block])
        if row[0] != 1:
            raise StoreError(
                f"store {self.path}: block {block} (samples {start}..{stop - 1}) is not "
                "complete yet; finish the recording first"
            )
        try:
            values = self._read_chunk(self._arrays[layer], block, stop - start, shape)
        except Exception as exc:  # codec failure on damaged bytes
            raise CorruptBlockError(
                self.path, layer, block, start, stop, f"cannot decode ({exc})"
            ) from exc
        if verify:
            crc = self._checksum(values)
            if crc != int(row[1 + self.fields.index(layer)]):
                raise CorruptBlockError(self.path, layer, block, start, stop, "checksum mismatch")
        if decode and layer in self.identity["shapes"]:
            return from_storage(values, self.dtype)
        return values

    def _read_chunk(
        self, arr: zarr.Array, block: int, samples: int, shape: tuple[int, ...]
    ) -> np.ndarray:
        """A block's data: straight from its file for plain local chunks, else via zarr."""
        path = self._direct_chunk_path(arr, block)
        if path is None or not path.exists():
            start = block * self.block_samples
            return np.asarray(arr[start : start + samples])
        count = samples * int(np.prod(shape, dtype=np.int64))
        values = np.fromfile(path, dtype=arr.dtype, count=count)
        if values.size != count:
            raise ValueError(f"chunk file {path.name} holds {values.size} values, expected {count}")
        return values.reshape(samples, *shape)

    def verify(self, blocks: Iterable[int] | None = None) -> list[CorruptBlockError]:
        """Check every complete block (or ``blocks``); return the corrupt ones found."""
        problems = []
        for block in self.completed_blocks() if blocks is None else blocks:
            for layer in self.fields:
                try:
                    self.read_block(layer, int(block), decode=False)
                except CorruptBlockError as exc:
                    problems.append(exc)
        return problems

    def layer(self, layer: str, *, complete_only: bool = True) -> xr.DataArray:
        """``layer`` as a lazy (dask) ``xarray.DataArray`` with named dims and provenance attrs.

        Only samples of complete blocks are included unless ``complete_only=False``
        (then unwritten samples read as zeros).
        """
        import dask.array as da

        info = self.layer_info(layer)
        arr = self._arrays[layer]
        chunks = (arr.shards or arr.chunks) if self.identity["chunk_samples"] else arr.chunks
        data = da.from_array(arr, chunks=chunks, asarray=True, lock=False)
        if self.dtype == "bfloat16":
            data = data.map_blocks(from_storage, "bfloat16", dtype=np.float32)
        coords: dict[str, Any] = {
            "sample": ("sample", self.sample_ids()),
            "unit": ("unit", np.asarray(self._group[f"layers/{layer}/unit"][:])),
        }
        out = xr.DataArray(data, dims=info.dims, coords=coords, name=layer, attrs=self.attrs(layer))
        if complete_only and not self.is_complete():
            out = out.isel(sample=self.completed_samples())
        return out

    def to_dataset(
        self, layers: Sequence[str] | None = None, *, complete_only: bool = True
    ) -> xr.Dataset:
        """All (or the given) layers as one ``xarray.Dataset``, one variable per layer.

        Dims shared by all layers keep their names when their sizes agree (``sample``
        always); where layers differ (e.g. unit counts) the dim is named ``unit_<layer>``.
        """
        layers = list(layers or self.layers)
        arrays = {name: self.layer(name, complete_only=complete_only) for name in layers}
        sizes: dict[str, set[int]] = {}
        for arr in arrays.values():
            for dim, size in arr.sizes.items():
                sizes.setdefault(dim, set()).add(size)
        renamed = {}
        for name, arr in arrays.items():
            clash = {d: f"{d}_{name}" for d in arr.dims if d != "sample" and len(sizes[d]) > 1}
            renamed[name] = arr.rename(clash) if clash else arr
        attrs = {k: v for k, v in self.attrs(layers[0]).items() if k != "layer"}
        attrs["layers"] = layers
        return xr.Dataset(renamed, attrs=attrs)

    def attrs(self, layer: str | None = None) -> dict[str, Any]:
        """Provenance attrs: model, model_hash, layer, source, source_fingerprint, seed, dtype, nethook_version."""
        ident = self.identity
        out = {
            "model": ident.get("model") or "",
            "model_hash": ident.get("model_hash") or "",
            "source": ident.get("source") or "",
            "source_fingerprint": ident.get("source_fingerprint") or "",
            "seed": ident["seed"] if ident.get("seed") is not None else "",
            "dtype": ident["dtype"],
            "nethook_version": ident["nethook_version"],
        }
        if layer is not None:
            out["layer"] = layer
        return out

    def summary(self) -> dict[str, Any]:
        """What the store holds and how complete it is (plain data, for ``nethook info``)."""
        done = self.completed_blocks()
        complete_samples = int(sum(np.diff(self.block_range(int(b)))[0] for b in done))
        layers = {}
        for name in self.layers:
            info = self.layer_info(name)
            layers[name] = {
                "dims": dict(zip(info.dims, (self.samples, *info.sample_shape), strict=True)),
                "bytes": int(
                    self.samples * np.prod(info.sample_shape) * storage_dtype(self.dtype).itemsize
                ),
            }
        missing = self.missing_blocks()
        return {
            "path": self.path,
            **{
                k: self.identity.get(k)
                for k in (
                    "model",
                    "model_hash",
                    "source",
                    "source_fingerprint",
                    "seed",
                    "dtype",
                    "nethook_version",
                )
            },
            "samples": self.samples,
            "complete_samples": complete_samples,
            "blocks": self.n_blocks,
            "complete_blocks": len(done),
            "missing_ranges": _ranges([self.block_range(int(b)) for b in missing]),
            "block_samples": self.block_samples,
            "chunk_samples": self.identity.get("chunk_samples"),
            "compressor": self.identity.get("compressor"),
            "layers": layers,
            **({"sample_data": self.identity["sample_data"]} if self.sample_data else {}),
        }

    # ---- durability (local disks) ------------------------------------------------

    def _local_root(self) -> Path | None:
        store = self._group.store
        return Path(store.root) if isinstance(store, LocalStore) else None

    def _chunk_path(self, arr: zarr.Array, coords: tuple[int, ...]) -> Path | None:
        root = self._local_root()
        if root is None:
            return None
        return root / arr.path / arr.metadata.encode_chunk_key(coords)

    def _sync_paths(self, paths: Iterable[Path | None]) -> None:
        """fsync files that exist (zarr skips chunks equal to the fill value)."""
        for path in paths:
            if path is not None and path.exists():
                fsync_file(path)

    def _sync_metadata(self) -> None:
        root = self._local_root()
        if root is None:
            return
        for dirpath, _, files in os.walk(root):
            for f in files:
                if f == "zarr.json":
                    fsync_file(Path(dirpath) / f)

    def _remove_partial_files(self) -> None:
        """Delete temp files a killed writer left behind (local stores)."""
        root = self._local_root()
        if root is None:
            return
        for dirpath, _, files in os.walk(root):
            for f in files:
                if f.endswith(".partial"):
                    (Path(dirpath) / f).unlink(missing_ok=True)

    def __repr__(self) -> str:
        done = len(self.completed_blocks())
        return (
            f"ActivationStore({self.path!r}, layers={self.layers}, samples={self.samples}, "
            f"dtype={self.dtype}, blocks {done}/{self.n_blocks} complete)"
        )


class BlockStream:
    """One block being written piece by piece (see :meth:`ActivationStore.stream_block`).

    Pieces go to a temporary file per layer with a running checksum; :meth:`commit`
    pads an edge block with the fill value, renames the files into place and marks
    the block complete once they are durable. A stream never committed leaves only
    temporary files, which the next resume deletes.
    """

    def __init__(self, store: ActivationStore, block: int):
        self.store = store
        self.block = block
        start, stop = store.block_range(block)
        self.samples = stop - start
        self._files: dict[str, Any] = {}
        self._tmp: dict[str, Path] = {}
        self._crc = dict.fromkeys(store.fields, 0)
        self._count = dict.fromkeys(store.fields, 0)

    def append(self, layer: str, values: np.ndarray) -> None:
        """Write the next ``values.shape[0]`` samples of ``layer`` (storage dtype), or of
        a sample data array (its own dtype)."""
        store = self.store
        expected, stored = store.field_layout(layer)
        if values.shape[1:] != expected or values.dtype != stored:
            raise ValueError(
                f"block {self.block} of layer {layer!r}: got {values.dtype}{list(values.shape)}, "
                f"expected {stored}[n, {', '.join(map(str, expected))}]"
            )
        if self._count[layer] + values.shape[0] > self.samples:
            raise ValueError(
                f"block {self.block} of layer {layer!r} holds {self.samples} samples; "
                f"got {self._count[layer] + values.shape[0]}"
            )
        values = np.ascontiguousarray(values)
        try:
            if layer not in self._files:
                path = store._direct_chunk_path(store._arrays[layer], self.block)
                path.parent.mkdir(parents=True, exist_ok=True)
                self._tmp[layer] = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
                self._files[layer] = open(self._tmp[layer], "wb")  # noqa: SIM115
            self._files[layer].write(memoryview(values).cast("B"))
        except OSError as exc:
            self.abort()
            raise _write_error(exc, store.path, f"write block {self.block}") from exc
        self._crc[layer] = store._checksum(values, self._crc[layer])
        self._count[layer] += values.shape[0]

    @property
    def full(self) -> bool:
        """True when every layer has all the block's samples."""
        return all(n == self.samples for n in self._count.values())

    def commit(self, background: bool = False) -> None:
        """Finish the files and mark the block complete (after an fsync; see write_block)."""
        store = self.store
        if not self.full:
            raise ValueError(
                f"block {self.block} is not full: samples per layer {self._count}, "
                f"expected {self.samples}"
            )
        paths = []
        try:
            for layer in store.fields:
                f = self._files.pop(layer)
                arr = store._arrays[layer]
                pad = arr.chunks[0] - self.samples
                if pad:
                    f.write(bytes(pad * int(np.prod(arr.chunks[1:])) * arr.dtype.itemsize))
                f.close()
                path = store._direct_chunk_path(arr, self.block)
                os.replace(self._tmp.pop(layer), path)
                paths.append(path)
        except OSError as exc:
            self.abort()
            raise _write_error(exc, store.path, f"write block {self.block}") from exc
        row = np.array([1] + [self._crc[layer] for layer in store.fields], np.uint64)
        store._complete(self.block, paths, row, background)

    def abort(self) -> None:
        """Drop what was written of this block."""
        for f in self._files.values():
            f.close()
        for tmp in self._tmp.values():
            tmp.unlink(missing_ok=True)
        self._files.clear()
        self._tmp.clear()


def check_identity(
    path: str, have: Mapping[str, Any], wanted: Mapping[str, Any], auto_block: bool = False
) -> None:
    """Raise :class:`StoreMismatchError` naming every identity field that differs.

    Only fields present in ``wanted`` are compared; a ``model_hash`` or
    ``source_fingerprint`` of None (unknown to this run) is not compared, nor is
    ``block_samples`` when ``auto_block`` (the run left it to the store).
    """
    fields = [f for f in (*IDENTITY_FIELDS, "shapes") if f in wanted]
    skip = {"block_samples"} if auto_block else set()
    skip |= {f for f in ("model_hash", "source_fingerprint") if wanted.get(f) is None}

    def value(record: Mapping[str, Any], field: str) -> Any:
        return record.get(field) or {} if field == "sample_data" else record.get(field)

    diffs = [
        f"{field}: store has {value(have, field)!r}, this run has {value(wanted, field)!r}"
        for field in fields
        if field not in skip and _norm(value(have, field)) != _norm(value(wanted, field))
    ]
    if diffs:
        raise StoreMismatchError(
            f"refusing to append to store {path}: it was recorded differently ("
            + "; ".join(diffs)
            + "). Use a new --out path, or delete the store to start over."
        )


def _sample_data_spec(
    sample_data: Mapping[str, tuple[Sequence[int], str]], layers: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """Check ``{name: (per-sample shape, dtype)}``; return it as identity JSON."""
    out = {}
    for name, spec in sample_data.items():
        name = str(name)
        if name in layers or "/" in name or name.startswith("__"):
            raise ValueError(
                f"sample data name {name!r} clashes with a layer or is not a Zarr node name"
            )
        try:
            shape, dtype = spec
            dtype = np.dtype(dtype)
            shape = [int(d) for d in shape]
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"sample data {name!r} must be (per-sample shape, numpy dtype), got {spec!r}"
            ) from exc
        if dtype.kind not in "biuf" or any(d < 1 for d in shape):
            raise ValueError(
                f"sample data {name!r}: expected a bool, integer or float dtype and a "
                f"positive shape, got {dtype} {shape}"
            )
        out[name] = {"shape": shape, "dtype": dtype.name}
    return out


def _norm(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _norm(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_norm(v) for v in value]
    return value


def _check_path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if path.startswith("file://"):
        path = path[len("file://") :]
    if "://" not in path and os.path.isfile(path):
        raise StoreError(f"store path {path} is a file; expected a directory (a Zarr store)")
    return path


def read_identity(path: str | os.PathLike, storage_options: dict | None = None) -> dict | None:
    """The identity recorded in the store at ``path``, or None if there is no store yet."""
    path = _check_path(path)
    group = _try_open_group(path, storage_options)
    if group is None:
        return None
    if "nethook" not in group.attrs:
        if len(list(group.keys())):
            raise StoreError(f"{path} already holds a Zarr group that is not a nethook store")
        return None
    return dict(group.attrs["nethook"])


def _try_open_group(path: str, storage_options: dict | None, mode: str = "r") -> zarr.Group | None:
    if "://" not in path and not os.path.exists(path):
        return None
    try:
        return zarr.open_group(path, mode=mode, storage_options=storage_options)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        return None


def _array_paths(group: zarr.Group) -> set[str]:
    names = set()
    for name in ("sample", "manifest"):
        if _exists(group, name):
            names.add(name)
    if "layers" in group:
        for layer_name, layer_group in group["layers"].groups():
            for arr_name in ("activations", "unit"):
                if _exists(layer_group, arr_name):
                    names.add(f"layers/{layer_name}/{arr_name}")
    if "sample_data" in group:
        for name, _ in group["sample_data"].arrays():
            names.add(f"sample_data/{name}")
    return names


def _exists(group: zarr.Group, name: str) -> bool:
    try:
        group[name]
    except (KeyError, ValueError, OSError):
        return False
    return True


def _compressors(name: str | None) -> Any:
    if name is None:
        return None
    from zarr.codecs import BloscCodec, ZstdCodec

    return ZstdCodec(level=1) if name == "zstd" else BloscCodec(cname="lz4", clevel=5)


def _write_file(path: Path, values: np.ndarray, sync: bool) -> None:
    """Write an array's raw bytes to ``path`` atomically (temp name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(memoryview(np.ascontiguousarray(values)).cast("B"))
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_error(exc: OSError, path: str, what: str) -> StoreError:
    reason = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EROFS: "the file system is read-only",
    }.get(exc.errno, str(exc))
    return StoreError(
        f"cannot {what} in store {path}: {reason}. Every block already marked complete is "
        "kept; fix the cause and rerun the same command to resume."
    )


def _ranges(pairs: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Merge adjacent ``(start, stop)`` pairs into ``[start, stop]`` runs."""
    out: list[list[int]] = []
    for start, stop in pairs:
        if out and out[-1][1] == start:
            out[-1][1] = stop
        else:
            out.append([start, stop])
    return out
