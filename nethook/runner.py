"""The one batch loop: source -> model under TraceDict -> per-layer consumers.

::

    from nethook.runner import run, StatConsumer, StoreWriter
    from nethook.stats.moments import Variance

    consumers = {
        "var": StatConsumer(Variance(), "layer3"),        # flatten([B,C,H,W]) -> [N,C]
        "store": StoreWriter("acts.zarr", ["layer3"], samples=len(source)),
    }
    run(model, source, consumers, batch_size=64, checkpoint="tally.ckpt.npz")

A *consumer* is any callable ``consumer(batch: Batch)`` with a ``layers`` attribute (the
layers it needs). It receives the whole :class:`Batch`: the activations of every traced
layer (``[B, C, H, W]`` / ``[B, T, C]`` / ``[B, C]`` as the model made them), the
source's batch (images, labels, ...) and the sample positions, so a per-batch function
can combine activations with labels (dissection's IoU) while a :class:`StatConsumer`
flattens to ``[N, C]`` for moment stats. Consumers with ``state_dict()`` /
``load_state_dict()`` are checkpointed every ``checkpoint_every`` batches (atomically),
so a killed tally resumes where it stopped with the same state as an uninterrupted run.

:func:`run_store` feeds the same consumers from an :class:`~nethook.store.ActivationStore`
instead of the model (a second pass from disk, no forward pass).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from nethook.atomic import atomic_path
from nethook.models import model_device
from nethook.stats.base import Stat, flatten
from nethook.store import (
    ActivationStore,
    StoreError,
    StoreMismatchError,
    check_identity,
    from_storage,
    read_identity,
    storage_dtype,
    to_storage,
)

CHECKPOINT_VERSION = 1


@dataclass
class Batch:
    """One batch as consumers see it.

    ``acts`` maps layer name -> activations ``[B, ...]`` (model layout, on the run's
    device); ``data`` is the source's batch (for a concept source a dict with
    ``image``, ``labels``, ``image_labels``, ``index``), or None in a store pass without
    a source; ``positions`` are the samples' positions in the source, ``start`` the
    run-relative index of the first sample and ``number`` the batch's number in the run.
    ``inputs`` maps layer name -> the layer's input, filled only when a consumer reads
    inputs (``StatConsumer(..., of="input")``: a layer's keys, for rewriting).
    """

    acts: dict[str, torch.Tensor]
    data: Any
    positions: torch.Tensor
    start: int
    number: int
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.positions.shape[0])


@runtime_checkable
class Consumer(Protocol):
    """What the runner feeds: ``consumer(batch)``; ``layers`` names the layers it needs.

    Optional methods: ``state_dict()`` / ``load_state_dict(sd)`` (checkpointed),
    ``resume_batch(batch_size)`` (first batch number it still needs when the run
    restarts), ``close()`` (called after the last batch) and ``abort()`` (called
    instead when the run fails).
    """

    layers: Sequence[str]

    def __call__(self, batch: Batch) -> None: ...


class StatConsumer:
    """Feed one layer's activations into a stat, flattened to ``[N, C]``.

    ``transform`` turns the layer's ``[B, ...]`` activations into the stat's input;
    the default is :func:`nethook.stats.flatten` (``[B,C,H,W]`` / ``[B,T,C]`` -> ``[N,C]``).
    ``of="input"`` feeds the layer's input instead of its output (the runner then
    retains inputs; a store holds outputs only).
    """

    def __init__(
        self,
        stat: Stat,
        layer: str,
        transform: Callable[[torch.Tensor], torch.Tensor] = flatten,
        of: str = "output",
    ):
        if of not in ("output", "input"):
            raise ValueError(f"StatConsumer of= must be 'output' or 'input', got {of!r}")
        self.stat = stat
        self.layer = layer
        self.layers = (layer,)
        self.transform = transform
        self.of = of

    def __call__(self, batch: Batch) -> None:
        if self.of == "input":
            if self.layer not in batch.inputs:
                raise ValueError(
                    f"StatConsumer needs the input of layer {self.layer!r}, which this pass "
                    "does not provide (inputs come from running the model, not from a store)"
                )
            self.stat.update(self.transform(batch.inputs[self.layer]))
        else:
            self.stat.update(self.transform(batch.acts[self.layer]))

    def state_dict(self) -> dict[str, Any]:
        return self.stat.state_dict()

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.stat.load_state_dict(sd)

    def __repr__(self) -> str:
        return f"StatConsumer({self.stat!r}, {self.layer!r})"


class FunctionConsumer:
    """Wrap a plain function ``fn(batch)`` as a consumer of ``layers``."""

    def __init__(self, fn: Callable[[Batch], None], layers: str | Sequence[str]):
        self.fn = fn
        self.layers = (layers,) if isinstance(layers, str) else tuple(layers)

    def __call__(self, batch: Batch) -> None:
        self.fn(batch)


class StoreWriter:
    """Consumer that records layers into an :class:`ActivationStore`, off the main thread.

    The store is created at the first batch (when the layer shapes are known) or, if it
    already exists, checked against this run's identity at once and resumed: samples of
    complete blocks are skipped. Conversion to the storage dtype, the zarr write, the
    fsync and the manifest entry happen in a background thread, overlapping the next
    forward pass. ``attrs`` holds the provenance (model, model_hash, source,
    source_fingerprint, seed); other options go to :meth:`ActivationStore.create`.
    The run's sample ``i`` is the store's sample ``offset + i``; a writer that feeds only
    part of the store (a shard, see :mod:`nethook.scale`) says how many with ``span``.
    ``sample_data(batch)`` returns per-sample tensors ``[B, ...]`` by name (bool, integer
    or float, e.g. a concept source's labels) recorded beside the activations in the
    same blocks; :func:`run_store` hands them back as the batch's ``data``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        layers: str | Sequence[str],
        *,
        samples: int,
        dtype: str = "float32",
        attrs: Mapping[str, Any] | None = None,
        sample_ids: Sequence[int] | np.ndarray | None = None,
        block_samples: int | None = None,
        chunk_samples: int | None = None,
        compressor: str | None = None,
        storage_options: dict | None = None,
        offset: int = 0,
        span: int | None = None,
        queue_size: int = 4,
        sample_data: Callable[[Batch], Mapping[str, torch.Tensor]] | None = None,
    ):
        self.path = os.fspath(path)
        self.sample_data = sample_data
        self.offset = int(offset)
        self.span = int(span) if span is not None else int(samples) - self.offset
        self.layers = (layers,) if isinstance(layers, str) else tuple(layers)
        self.samples = int(samples)
        storage_dtype(dtype)
        self.options: dict[str, Any] = {
            "dtype": dtype,
            "attrs": dict(attrs or {}),
            "sample_ids": sample_ids,
            "block_samples": block_samples,
            "chunk_samples": chunk_samples,
            "compressor": compressor,
            "storage_options": storage_options,
        }
        self.store: ActivationStore | None = None
        self._done_blocks: set[int] = set()
        have = read_identity(self.path, storage_options)
        if have is not None:
            wanted = {
                **{k: v for k, v in self.options["attrs"].items()},
                "layers": list(self.layers),
                "samples": self.samples,
                "dtype": dtype,
                "chunk_samples": chunk_samples,
                "compressor": compressor,
            }
            if block_samples is not None:  # clamped to the samples, as the store does
                wanted["block_samples"] = min(int(block_samples), self.samples)
            check_identity(self.path, have, wanted)
            with contextlib.suppress(StoreError):
                self.store = ActivationStore.open(self.path, "r+", storage_options)
                self._done_blocks = set(self.store.completed_blocks().tolist())
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._buffers: dict[int, dict[str, np.ndarray]] = {}
        self._full: dict[int, dict[str, np.ndarray]] = {}
        self._free: list[dict[str, np.ndarray]] = []
        self._filled: dict[int, int] = {}
        self._streams: dict[int, Any] = {}
        self._scratch: dict[str, np.ndarray] = {}

    def resume_batch(self, batch_size: int) -> int:
        """First batch number holding a sample of an incomplete block."""
        if self.store is None:
            return 0
        for block in self.store.missing_blocks():
            start, stop = self.store.block_range(int(block))
            if stop > self.offset and start < self.offset + self.span:
                return max(0, start - self.offset) // batch_size
        return -(-self.span // batch_size)

    def __call__(self, batch: Batch) -> None:
        if self._error is not None:
            raise self._error
        extra = {}
        if self.sample_data is not None:
            extra = {k: torch.as_tensor(v).detach() for k, v in self.sample_data(batch).items()}
        if self.store is None:
            shapes = {name: tuple(batch.acts[name].shape[1:]) for name in self.layers}
            layout = {k: (tuple(v.shape[1:]), _numpy_dtype(v)) for k, v in extra.items()}
            self.store = ActivationStore.open_or_create(
                self.path,
                layers=shapes,
                samples=self.samples,
                sample_data=layout,
                **self.options,
            )
            self._done_blocks = set(self.store.completed_blocks().tolist())
        if set(extra) != set(self.store.sample_data):
            raise StoreMismatchError(
                f"store {self.path} holds sample data {sorted(self.store.sample_data)}, "
                f"this run records {sorted(extra)}"
            )
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="nethook-store-writer")
            self._thread.daemon = True
            self._thread.start()
        acts = {}
        for name in self.layers:
            t = batch.acts[name].detach()
            if t.device.type != "cpu":  # narrow on the device, move fewer bytes
                t = t.to(getattr(torch, self.store.dtype)).cpu()
            acts[name] = t
        for name, t in extra.items():
            acts[name] = t.cpu()
        self._put((self.offset + batch.start, acts))

    def _put(self, item: Any) -> None:
        while True:
            if self._error is not None:
                raise self._error
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _work(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    if self.store is not None:
                        self.store.flush()
                    return
                self._absorb(*item)
        except BaseException as exc:  # handed to the main thread
            self._error = exc

    def _absorb(self, start: int, acts: dict[str, torch.Tensor]) -> None:
        """Hand a batch's samples to their blocks; complete blocks that fill up.

        Plain local layouts stream each piece straight to the block's chunk files;
        others cast into a block buffer (one pass) and write the block when full.
        """
        store = self.store
        assert store is not None
        if store.can_stream():
            self._stream(start, acts)
            return
        size = store.block_samples
        n = next(iter(acts.values())).shape[0]
        pos = start
        while pos < start + n:
            block = pos // size
            b_start, b_stop = store.block_range(block)
            take = min(b_stop, start + n) - pos
            if block not in self._done_blocks:
                if block not in self._buffers:
                    if not self._free:  # fresh pages cost a fault each: recycle buffers
                        self._free.append(
                            {
                                name: np.empty((size, *t.shape[1:]), store.field_layout(name)[1])
                                for name, t in acts.items()
                            }
                        )
                    full = self._free.pop()
                    self._buffers[block] = {k: v[: b_stop - b_start] for k, v in full.items()}
                    self._full[block] = full
                    self._filled[block] = 0
                for name, t in acts.items():
                    dst = _as_tensor(
                        self._buffers[block][name][pos - b_start :][:take],
                        store.dtype if name in store.layers else None,
                    )
                    dst.copy_(t[pos - start : pos - start + take])
                self._filled[block] += take
                if self._filled[block] == b_stop - b_start:
                    store.write_block(block, self._buffers.pop(block), background=True)
                    self._free.append(self._full.pop(block))  # written: reusable
                    del self._filled[block]
                    self._done_blocks.add(block)
            pos += take

    def _stream(self, start: int, acts: dict[str, torch.Tensor]) -> None:
        store = self.store
        assert store is not None
        n = next(iter(acts.values())).shape[0]
        pos = start
        while pos < start + n:
            block = pos // store.block_samples
            _, b_stop = store.block_range(block)
            take = min(b_stop, start + n) - pos
            if block not in self._done_blocks:
                stream = self._streams.get(block)
                if stream is None:
                    stream = self._streams[block] = store.stream_block(block)
                for name, t in acts.items():
                    stream.append(name, self._cast(name, t[pos - start : pos - start + take]))
                if stream.full:
                    self._streams.pop(block).commit(background=True)
                    self._done_blocks.add(block)
            pos += take

    def _cast(self, name: str, piece: torch.Tensor) -> np.ndarray:
        """``piece`` in the storage dtype: a view when it already is, else cast into a
        reused scratch buffer (fresh memory would cost a page fault per page)."""
        store = self.store
        if name not in store.layers:  # sample data: its own dtype
            stored = store.field_layout(name)[1]
            if piece.numpy().dtype == stored:
                return piece.numpy()
            dtype = None
        else:
            dtype = store.dtype
            if piece.device.type == "cpu" and piece.dtype == getattr(torch, dtype):
                return to_storage(piece, dtype)
            stored = storage_dtype(dtype)
        scratch = self._scratch.get(name)
        if (
            scratch is None
            or scratch.shape[0] < piece.shape[0]
            or scratch.shape[1:] != piece.shape[1:]
        ):
            scratch = np.empty(piece.shape, stored)
            self._scratch[name] = scratch
        out = scratch[: piece.shape[0]]
        _as_tensor(out, dtype).copy_(piece)
        return out

    def close(self) -> None:
        """Write every buffered complete block and stop the writer thread."""
        self._stop()
        for stream in self._streams.values():
            stream.abort()  # blocks this run did not fill (it covered part of them)
        self._streams.clear()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Stop the writer thread after the blocks already queued (errors are dropped)."""
        with contextlib.suppress(BaseException):
            self._stop()
        for stream in self._streams.values():
            stream.abort()  # partial blocks: nothing of them stays
        self._streams.clear()

    def _stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._put(None)
            self._thread.join()
        self._thread = None


def _numpy_dtype(t: torch.Tensor) -> str:
    """The numpy dtype name of a tensor's dtype (for sample data arrays)."""
    return torch.empty(0, dtype=t.dtype).numpy().dtype.name


def _as_tensor(buffer: np.ndarray, dtype: str | None) -> torch.Tensor:
    """A torch view of a storage buffer, typed so ``copy_`` casts straight into it
    (``dtype`` is the store's storage dtype, or None for a sample data buffer)."""
    if dtype == "bfloat16":
        return torch.from_numpy(buffer.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(buffer)


# ---- checkpoints ---------------------------------------------------------------------


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Write a nested dict of numpy arrays and JSON-able leaves to ``path`` (.npz), atomically."""
    arrays: dict[str, np.ndarray] = {}
    plain: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            if not value:
                plain[prefix] = {}
            for k, v in value.items():
                if "/" in str(k):
                    raise ValueError(f"checkpoint key {k!r} contains '/'")
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        elif isinstance(value, torch.Tensor):
            arrays[prefix] = value.detach().cpu().numpy()
        elif isinstance(value, np.ndarray):
            arrays[prefix] = value
        elif isinstance(value, np.generic):
            plain[prefix] = value.item()
        else:
            plain[prefix] = value

    walk("", state)
    with atomic_path(path, suffix=".partial", fsync=True) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, __plain__=np.array(json.dumps(plain)), **arrays)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` back into a nested dict."""
    out: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        *parents, last = key.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value

    with np.load(path, allow_pickle=False) as data:
        for key, value in json.loads(str(data["__plain__"])).items():
            put(key, value)
        for key in data.files:
            if key != "__plain__":
                put(key, data[key])
    return out


class Checkpoint:
    """Periodic, atomic checkpoints of the stateful consumers of a run."""

    def __init__(self, path: str | os.PathLike, every: int = 100, key: str | None = None):
        if every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {every}")
        self.path = Path(path)
        self.every = every
        self.key = key

    def meta(
        self,
        batch_size: int,
        start: int,
        samples: int,
        names: Iterable[str],
        shard: tuple[int, int] | None = None,
    ) -> dict:
        meta = {
            "version": CHECKPOINT_VERSION,
            "batch_size": batch_size,
            "start": start,
            "samples": samples,
            "consumers": sorted(names),
            "key": self.key or "",
        }
        if shard is not None:  # one process's share of a run: its own checkpoint
            meta["shard"] = list(shard)
        return meta

    def load(self, meta: dict) -> tuple[int, dict[str, Any]] | None:
        """Return ``(batches_done, states)`` if a matching checkpoint exists."""
        if not self.path.exists():
            return None
        saved = load_checkpoint(self.path)
        have = saved.get("meta", {})
        diffs = [
            f"{k}: checkpoint has {have.get(k)!r}, this run has {v!r}"
            for k, v in meta.items()
            if _plain(have.get(k)) != _plain(v)
        ]
        if diffs:
            raise ValueError(
                f"checkpoint {self.path} belongs to a different run ("
                + "; ".join(diffs)
                + "); delete it or pass another checkpoint path"
            )
        return int(saved["batches_done"]), saved.get("states", {})

    def save(self, meta: dict, batches_done: int, states: dict[str, Any]) -> None:
        save_checkpoint(self.path, {"meta": meta, "batches_done": batches_done, "states": states})


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return value


# ---- the loop ------------------------------------------------------------------------


def _as_dict(consumers: Mapping[str, Any] | Sequence[Any] | Any) -> dict[str, Any]:
    if isinstance(consumers, Mapping):
        out = {str(k): v for k, v in consumers.items()}
    elif isinstance(consumers, Sequence):
        out = {str(i): c for i, c in enumerate(consumers)}
    else:
        out = {"0": consumers}
    for name, c in out.items():
        if not callable(c) or not hasattr(c, "layers"):
            raise TypeError(
                f"consumer {name!r} ({type(c).__name__}) is not a consumer: expected a "
                "callable with a `layers` attribute (wrap functions in FunctionConsumer)"
            )
    return out


def _stateful(c: Any) -> bool:
    return hasattr(c, "state_dict") and hasattr(c, "load_state_dict")


def _needed_layers(consumers: Mapping[str, Any], layers: Sequence[str] | None) -> list[str]:
    if layers is not None:
        return list(layers)
    return list(dict.fromkeys(name for c in consumers.values() for name in c.layers))


def default_inputs(source: Any, device: torch.device | str | None) -> Callable[[Any], Any]:
    """How a source batch becomes the model's input.

    A concept-source dict gives ``image`` normalized with ``source.normalization``; a
    tuple/list gives its first element; a tensor is used as is. The result is moved to
    ``device``.
    """
    norm = getattr(source, "normalization", None)
    mean = std = None
    if norm is not None:
        mean = torch.tensor(norm[0], dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(norm[1], dtype=torch.float32).view(1, -1, 1, 1)

    def inputs(data: Any) -> Any:
        if isinstance(data, Mapping):
            x = data["image"]
            if mean is not None:
                x = (x - mean.to(x.device)) / std.to(x.device)
        elif isinstance(data, list | tuple):
            x = data[0]
        else:
            x = data
        return x.to(device) if device is not None else x

    return inputs


def run(
    model: torch.nn.Module,
    source: Dataset,
    consumers: Mapping[str, Consumer] | Sequence[Consumer] | Consumer,
    *,
    layers: Sequence[str] | None = None,
    batch_size: int = 32,
    samples: int | None = None,
    start: int = 0,
    num_workers: int = 0,
    collate_fn: Callable | None = None,
    inputs: Callable[[Any], Any] | None = None,
    device: torch.device | str | None = None,
    checkpoint: str | os.PathLike | Checkpoint | None = None,
    checkpoint_every: int = 100,
    checkpoint_key: str | None = None,
    clone: bool | None = None,
    seed: int = 0,
    progress: bool = True,
    desc: str = "running",
    offload: bool = False,
    shard: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Run ``model`` over samples ``start .. start+samples`` of ``source`` and feed consumers.

    Batches come in source order (a ``DataLoader`` without shuffling; ``num_workers``
    processes load them). The model runs under ``torch.no_grad()`` and
    ``TraceDict(model, layers, stop=True)``, so the forward pass ends after the last
    needed layer (default: every layer a consumer names). ``clone=True`` copies the
    traced outputs at once, so in-place ops downstream of a layer cannot change them;
    by default they are kept as they are and checked after the forward pass
    (:meth:`nethook.trace.Trace.changed`): a batch in which an in-place op changed
    one runs again with copies, and so does the rest of the run. With
    ``checkpoint`` (a path), stateful consumers are saved
    every ``checkpoint_every`` batches and a rerun resumes from the last save;
    ``checkpoint_key`` (e.g. a content key of model and source) must match to resume.
    ``offload=True`` runs the consumers in a worker process (CPU only; for consumers
    that keep their results in their state or in files, see :mod:`nethook.offload`):
    their work then overlaps the loading and forward pass of the next batch.
    ``shard=(part, parts)`` runs only the batches whose number is ``part`` modulo
    ``parts`` (batch numbers and positions stay those of the whole run), for runs
    split over processes that each take a share and merge their consumers after
    (see :func:`nethook.offload.in_parallel`); a shard checkpoints on its own.
    Returns the consumers, by name.
    """
    consumers = _as_dict(consumers)
    layers = _needed_layers(consumers, layers)
    if not layers:
        raise ValueError("no layers to trace: name them in `layers` or in the consumers")
    total = len(source) - start if samples is None else int(samples)
    if not 0 <= start or total < 1 or start + total > len(source):
        raise ValueError(
            f"samples {start}..{start + total - 1} are not in the source, which has "
            f"{len(source)} samples"
        )
    device = torch.device(device) if device is not None else model_device(model)
    inputs = inputs or default_inputs(source, device)
    copies = {"clone": bool(clone), "check": clone is None}
    collate_fn = collate_fn or getattr(source, "collate", None)
    positions = np.arange(start, start + total)
    retain_input = any(getattr(c, "of", "output") == "input" for c in consumers.values())

    def make_batches(first: int) -> Iterator[Batch]:
        numbers = shard_batches(first, -(-total // batch_size), shard)
        loader = DataLoader(
            Subset(source, positions.tolist()),
            batch_sampler=[
                range(b * batch_size, min((b + 1) * batch_size, total)) for b in numbers
            ],
            num_workers=num_workers,
            collate_fn=collate_fn,
            generator=torch.Generator().manual_seed(seed),
        )
        with torch.no_grad():
            for number, data in zip(numbers, loader, strict=True):
                offset = number * batch_size
                x = inputs(data)
                traces = _trace_batch(model, x, layers, copies["clone"], retain_input)
                if copies["check"] and any(traces[n].changed() for n in layers):
                    copies.update(clone=True, check=False)  # an in-place op: copy from now on
                    traces = _trace_batch(model, x, layers, True, retain_input)
                acts = {name: traces[name].output for name in layers}
                layer_inputs = {n: traces[n].input for n in layers} if retain_input else {}
                n = next(iter(acts.values())).shape[0]
                pos = torch.as_tensor(positions[offset : offset + n])
                yield Batch(acts, data, pos, offset, number, layer_inputs)

    return _drive(
        make_batches,
        consumers,
        total=total,
        batch_size=batch_size,
        start=start,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        checkpoint_key=checkpoint_key,
        progress=progress,
        desc=desc,
        offload=offload,
        shard=shard,
    )


def _trace_batch(
    model: torch.nn.Module, x: Any, layers: Sequence[str], clone: bool, retain_input: bool
) -> Any:
    """One forward pass of ``x`` under ``TraceDict``, stopped after the last of ``layers``."""
    from nethook.trace import TraceDict

    with TraceDict(
        model, layers, stop=True, clone=clone, detach=True, retain_input=retain_input
    ) as traces:
        model(x)
    return traces


def shard_batches(first: int, batches: int, shard: tuple[int, int] | None) -> list[int]:
    """Batch numbers ``first .. batches - 1`` that belong to ``shard`` ``(part, parts)``
    (those equal to ``part`` modulo ``parts``; all of them without a shard)."""
    if shard is None:
        return list(range(first, batches))
    part, parts = shard
    if not 0 <= part < parts:
        raise ValueError(f"shard must be (part, parts) with 0 <= part < parts, got {shard}")
    return [b for b in range(first, batches) if b % parts == part]


def run_store(
    store: ActivationStore | str | os.PathLike,
    consumers: Mapping[str, Consumer] | Sequence[Consumer] | Consumer,
    *,
    layers: Sequence[str] | None = None,
    batch_size: int = 32,
    source: Dataset | None = None,
    num_workers: int = 0,
    collate_fn: Callable | None = None,
    device: torch.device | str = "cpu",
    checkpoint: str | os.PathLike | Checkpoint | None = None,
    checkpoint_every: int = 100,
    checkpoint_key: str | None = None,
    verify: bool = True,
    progress: bool = True,
    desc: str = "reading store",
) -> dict[str, Any]:
    """Feed consumers from a complete store instead of the model (a second pass from disk).

    Batches have the same positions as in :func:`run` with the same ``batch_size``;
    activations arrive as float32 tensors on ``device``. With ``source`` given, each
    batch's ``data`` holds that source's items for the same samples (e.g. labels for
    dissection); without one, a store recorded with sample data gives those arrays
    (``{name: tensor [B, ...]}`` on ``device``) as ``data``. Blocks are read (and their
    checksums verified) in a background thread.
    """
    if not isinstance(store, ActivationStore):
        store = ActivationStore.open(store)
    consumers = _as_dict(consumers)
    layers = _needed_layers(consumers, layers)
    for name in layers:
        store.layer_info(name)
    missing = store.missing_blocks()
    if len(missing):
        gaps = store.summary()["missing_ranges"]
        raise StoreError(
            f"store {store.path} is incomplete (samples missing: "
            + ", ".join(f"{a}..{b - 1}" for a, b in gaps)
            + "); finish the recording before a second pass"
        )
    total = store.samples
    sample_ids = store.sample_ids()
    extras = list(store.sample_data) if source is None else []
    fields = [*layers, *extras]

    def make_batches(first: int) -> Iterator[Batch]:
        blocks = _prefetch(_read_blocks(store, fields, first * batch_size, verify))
        labels = None
        if source is not None:
            subset = Subset(source, sample_ids[first * batch_size :].tolist())
            labels = iter(
                DataLoader(
                    subset,
                    batch_size=batch_size,
                    shuffle=False,
                    num_workers=num_workers,
                    collate_fn=collate_fn or getattr(source, "collate", None),
                )
            )
        pending: dict[str, list[np.ndarray]] = {name: [] for name in fields}
        have = 0
        offset = first * batch_size
        number = first
        for block in blocks:
            for name in fields:
                pending[name].append(block[name])
            have += next(iter(block.values())).shape[0]
            while have >= batch_size or (have and offset + have == total):
                n = min(batch_size, have)
                acts = {}
                for name in fields:
                    joined = (
                        np.concatenate(pending[name])
                        if len(pending[name]) > 1
                        else pending[name][0]
                    )
                    acts[name] = torch.from_numpy(np.ascontiguousarray(joined[:n])).to(device)
                    pending[name] = [joined[n:]] if n < joined.shape[0] else []
                have -= n
                data = next(labels) if labels is not None else None
                if extras:
                    data = {name: acts.pop(name) for name in extras}
                pos = torch.as_tensor(sample_ids[offset : offset + n])
                yield Batch(acts, data, pos, offset, number)
                offset += n
                number += 1

    return _drive(
        make_batches,
        consumers,
        total=total,
        batch_size=batch_size,
        start=0,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        checkpoint_key=checkpoint_key,
        progress=progress,
        desc=desc,
    )


def _read_blocks(
    store: ActivationStore, layers: Sequence[str], first_sample: int, verify: bool
) -> Iterator[dict[str, np.ndarray]]:
    """Yield float32 data of every layer (sample data arrays as stored) from
    ``first_sample`` on, block by block."""
    first_block = first_sample // store.block_samples
    for block in range(first_block, store.n_blocks):
        b_start, _ = store.block_range(block)
        out = {}
        for name in layers:
            values = store.read_block(name, block, verify=verify, decode=False)
            if name in store.layers:
                values = from_storage(values, store.dtype).astype(np.float32, copy=False)
            out[name] = values[max(0, first_sample - b_start) :]
        yield out


def _prefetch(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Run ``items`` in a background thread, ``depth`` items ahead."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as exc:
            q.put(_Failure(exc))

    thread = threading.Thread(target=work, name="nethook-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()


@dataclass
class _Failure:
    exc: BaseException = field()


class InOrder:
    """Run calls one at a time on a worker thread, in order, while the caller goes on.

    Overlaps per-batch work (statistics updates, whose numpy and torch kernels release
    the GIL) with the caller producing the next batch (a generator's forward pass).
    :meth:`run` waits for the previous call first, so at most one is in flight;
    leaving the ``with`` block waits for the last one, and a call's error is raised in
    the caller. Only worth it when the caller's own work releases the GIL too: a
    caller running pure Python (rendering scenes) starves the worker of the GIL.
    """

    def __enter__(self) -> InOrder:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nethook-in-order")
        self.pending: Future | None = None
        return self

    def run(self, fn: Callable, *args: Any) -> None:
        """Wait for the previous call, then start ``fn(*args)``."""
        self.wait()
        self.pending = self.pool.submit(fn, *args)

    def wait(self) -> None:
        """Wait for the call in flight (raising its error, if any)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.wait()
        finally:
            self.pool.shutdown(wait=True)


def run_batches(
    make_batches: Callable[[int], Iterator[Batch]],
    consumers: Mapping[str, Consumer] | Sequence[Consumer] | Consumer,
    *,
    total: int,
    batch_size: int,
    checkpoint: str | os.PathLike | Checkpoint | None = None,
    checkpoint_every: int = 100,
    checkpoint_key: str | None = None,
    progress: bool = True,
    desc: str = "running",
    offload: bool = False,
    shard: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Feed consumers batches that the caller makes (from records of an earlier pass).

    ``make_batches(first)`` yields :class:`Batch` objects numbered ``first, first + 1,
    ...`` of ``batch_size`` samples (``total`` in all; with ``shard``, only the numbers
    :func:`shard_batches` gives); the loop, checkpoints, resume, progress, ``offload``
    and ``shard`` are those of :func:`run`. Returns the consumers, by name.
    """
    return _drive(
        make_batches,
        _as_dict(consumers),
        total=total,
        batch_size=batch_size,
        start=0,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        checkpoint_key=checkpoint_key,
        progress=progress,
        desc=desc,
        offload=offload,
        shard=shard,
    )


def _drive(
    make_batches: Callable[[int], Iterator[Batch]],
    consumers: dict[str, Any],
    *,
    total: int,
    batch_size: int,
    start: int,
    checkpoint: str | os.PathLike | Checkpoint | None,
    checkpoint_every: int,
    checkpoint_key: str | None,
    progress: bool,
    desc: str,
    offload: bool = False,
    shard: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """The shared loop: resume, feed consumers, checkpoint, show progress, close.

    With ``offload``, the consumers run in a worker process (:mod:`nethook.offload`);
    checkpoints and the end of the loop bring their states back. With ``shard``,
    ``make_batches`` yields only the shard's batches; a checkpoint is saved after
    the batch at which the count of batches passes a multiple of ``checkpoint_every``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_batches = -(-total // batch_size)
    stateful = {name: c for name, c in consumers.items() if _stateful(c)}
    ckpt = None
    if checkpoint is not None:
        ckpt = (
            checkpoint
            if isinstance(checkpoint, Checkpoint)
            else Checkpoint(checkpoint, checkpoint_every, checkpoint_key)
        )
    meta = ckpt.meta(batch_size, start, total, stateful, shard) if ckpt else {}
    done = 0
    if ckpt is not None:
        loaded = ckpt.load(meta)
        if loaded is not None:
            done, states = loaded
            for name, c in stateful.items():
                c.load_state_dict(states[name])
    starts = {}
    for name, c in consumers.items():
        if hasattr(c, "resume_batch"):
            starts[name] = int(c.resume_batch(batch_size))
        elif name in stateful:
            starts[name] = done
    first = min(starts.values(), default=0)
    for name in consumers:
        starts.setdefault(name, first)
    failed = True
    last_saved = done
    number = first
    feeder = None
    if offload and first < n_batches:
        from nethook.offload import Offload

        feeder = Offload(consumers, starts)
    try:
        if first < n_batches:
            mine = shard_batches(0, n_batches, shard)
            with tqdm(
                total=sum(min(batch_size, total - b * batch_size) for b in mine),
                initial=sum(min(batch_size, total - b * batch_size) for b in mine if b < first),
                unit="sample",
                desc=desc,
                disable=not progress,
                dynamic_ncols=True,
            ) as bar:
                for batch in make_batches(first):
                    if feeder is not None:
                        feeder(batch)
                    else:
                        _feed(consumers, starts, batch)
                    number = batch.number + 1
                    bar.update(len(batch))
                    due = number // ckpt.every > last_saved // ckpt.every if ckpt else False
                    if due and stateful:
                        if feeder is not None:
                            feeder.sync()
                        _save(ckpt, meta, number, stateful, starts)
                        last_saved = number
        if feeder is not None:
            feeder.finish(ok=True)  # the consumers close in the worker
        failed = False
    finally:
        if feeder is not None and failed:
            feeder.finish(ok=False)
        for c in consumers.values():
            if feeder is not None:
                break
            if failed and hasattr(c, "abort"):
                c.abort()
            elif not failed and hasattr(c, "close"):
                c.close()
    if ckpt is not None and stateful and n_batches > last_saved:
        _save(ckpt, meta, n_batches, stateful, starts)
    return consumers


def _feed(consumers: dict[str, Any], starts: dict[str, int], batch: Batch) -> None:
    """Hand ``batch`` to every consumer that has not seen it yet (a resumed one may have)."""
    for name, c in consumers.items():
        if batch.number >= starts[name]:
            c(batch)


def _save(
    ckpt: Checkpoint, meta: dict, number: int, stateful: dict[str, Any], starts: dict[str, int]
) -> None:
    if any(starts[name] > number for name in stateful):
        return  # some consumer has not reached this batch yet; its state would be ahead
    ckpt.save(meta, number, {name: c.state_dict() for name, c in stateful.items()})


def layer_shapes(
    model: torch.nn.Module,
    source: Dataset,
    layers: Sequence[str],
    *,
    start: int = 0,
    collate_fn: Callable | None = None,
    inputs: Callable[[Any], Any] | None = None,
    device: torch.device | str | None = None,
) -> dict[str, tuple[int, ...]]:
    """Per-sample activation shapes of ``layers``, from one forward pass on sample ``start``."""
    from nethook.trace import TraceDict

    device = torch.device(device) if device is not None else model_device(model)
    inputs = inputs or default_inputs(source, device)
    collate_fn = collate_fn or getattr(source, "collate", None)
    loader = DataLoader(Subset(source, [start]), batch_size=1, collate_fn=collate_fn)
    data = next(iter(loader))
    with torch.no_grad(), TraceDict(model, layers, stop=True) as traces:
        model(inputs(data))
    return {name: tuple(traces[name].output.shape[1:]) for name in traces}
