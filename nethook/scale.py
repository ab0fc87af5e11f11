"""Past one machine: the same reductions and recordings on ``dask.distributed``.

Every function here takes ``client``: ``None`` runs in this process, a
``distributed.Client`` or a scheduler address (``"tcp://host:8786"``) runs the same work
on that cluster. Nothing else changes, and neither does the result:

- :func:`tally_store` maps stat consumers over the blocks of an activation store
  (each task reads its blocks from the shared store) and merges the partial stats;
- :func:`tally_source` maps them over shards of a source, each worker running the
  model on its own device;
- :func:`record` records a store with each worker writing whole blocks of its shard.

Partial results are merged in one fixed binary tree (pairs of neighbours, level by
level, in sample order), locally as on the cluster, so a reduction gives bit-identical
results however many workers run it and in whatever order they finish.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from nethook.runner import Batch, StoreWriter, layer_shapes, run
from nethook.store import ActivationStore

Consumers = dict[str, Any]


def get_client(client: Any) -> Any:
    """``None`` -> None (run locally); an address -> a connected ``Client``; a Client as is."""
    if client is None or not isinstance(client, str):
        return client
    from distributed import Client

    return Client(client)


# ---- the fixed merge tree -----------------------------------------------------------


def merge_consumers(left: Consumers, right: Consumers) -> Consumers:
    """Merge ``right``'s stats into ``left``'s (consumers with a ``.stat``), return ``left``."""
    for name, consumer in left.items():
        consumer.stat.merge(right[name].stat)
    return left


class TreeReducer:
    """Merge partial results in the fixed tree, streaming (O(log n) partials held).

    Pushing ``x0, x1, ...`` and calling :meth:`result` gives the same tree as pairing
    neighbours level by level (an odd one out moves up a level unmerged).
    """

    def __init__(self, merge: Callable[[Any, Any], Any]):
        self.merge = merge
        self._stack: list[tuple[int, Any]] = []

    def push(self, item: Any) -> None:
        level = 0
        while self._stack and self._stack[-1][0] == level:
            _, left = self._stack.pop()
            item = self.merge(left, item)
            level += 1
        self._stack.append((level, item))

    def result(self) -> Any:
        if not self._stack:
            raise ValueError("nothing to reduce")
        _, item = self._stack.pop()
        while self._stack:
            _, left = self._stack.pop()
            item = self.merge(left, item)
        return item


def _tree_on_cluster(client: Any, futures: list, merge: Callable) -> Any:
    """Reduce futures by pairing neighbours level by level on the cluster."""
    while len(futures) > 1:
        nxt = [
            client.submit(merge, futures[i], futures[i + 1], pure=False)
            for i in range(0, len(futures) - 1, 2)
        ]
        if len(futures) % 2:
            nxt.append(futures[-1])
        futures = nxt
    return futures[0].result()


def _check_stat_consumers(stats: Mapping[str, Any]) -> Consumers:
    out = dict(stats)
    if not out:
        raise ValueError("no stats given: pass {name: StatConsumer(stat, layer)}")
    for name, consumer in out.items():
        if not hasattr(consumer, "stat") or not hasattr(consumer.stat, "merge"):
            raise TypeError(
                f"stat consumer {name!r} ({type(consumer).__name__}) has no mergeable .stat; "
                "scale-out reductions need StatConsumer-like objects"
            )
    return out


def _reduce(
    tasks: Sequence[tuple],
    work: Callable[..., Consumers],
    client: Any,
    progress: bool,
    desc: str,
) -> Consumers:
    client = get_client(client)
    if client is None:
        reducer = TreeReducer(merge_consumers)
        for args in tqdm(tasks, desc=desc, disable=not progress):
            reducer.push(work(*args))
        return reducer.result()
    from distributed import as_completed

    leaves = [client.submit(work, *args, pure=False) for args in tasks]
    for _ in tqdm(as_completed(leaves), total=len(leaves), desc=desc, disable=not progress):
        pass
    return _tree_on_cluster(client, leaves, merge_consumers)


# ---- reductions over a store --------------------------------------------------------


def tally_store(
    store: ActivationStore | str | os.PathLike,
    stats: Mapping[str, Any],
    *,
    client: Any = None,
    blocks_per_task: int = 1,
    verify: bool = True,
    storage_options: dict | None = None,
    progress: bool = True,
) -> Consumers:
    """Feed ``stats`` (name -> :class:`~nethook.runner.StatConsumer`, empty) every block of a store.

    Each task gets fresh copies of the consumers and ``blocks_per_task`` consecutive
    blocks; the partial stats are merged in the fixed tree. Returns new consumers (same
    names) holding the merged stats.
    """
    stats = _check_stat_consumers(stats)
    if isinstance(store, ActivationStore):
        path, storage_options = store.path, store.storage_options
    else:
        path = os.fspath(store)
    opened = ActivationStore.open(path, storage_options=storage_options)
    missing = opened.missing_blocks()
    if len(missing):
        raise ValueError(
            f"store {path} is incomplete ({len(missing)} of {opened.n_blocks} blocks "
            "missing); finish the recording first"
        )
    for consumer in stats.values():
        for layer in consumer.layers:
            opened.layer_info(layer)
    groups = _groups(range(opened.n_blocks), blocks_per_task)
    tasks = [(path, storage_options, tuple(g), stats, verify) for g in groups]
    return _reduce(tasks, _tally_blocks, client, progress, "tally blocks")


def _tally_blocks(
    path: str, storage_options: dict | None, blocks: Sequence[int], protos: Consumers, verify: bool
) -> Consumers:
    """One task: fresh consumers fed the given blocks, in order."""
    store = ActivationStore.open(path, storage_options=storage_options)
    consumers = copy.deepcopy(protos)
    layers = list(dict.fromkeys(name for c in consumers.values() for name in c.layers))
    ids = store.sample_ids()
    for block in blocks:
        start, stop = store.block_range(block)
        acts = {
            name: torch.from_numpy(
                np.asarray(store.read_block(name, block, verify=verify), dtype=np.float32)
            )
            for name in layers
        }
        batch = Batch(acts, None, torch.as_tensor(ids[start:stop]), start, block)
        for consumer in consumers.values():
            consumer(batch)
    return consumers


# ---- reductions over a source, the model on every worker --------------------------


def tally_source(
    model: str | torch.nn.Module,
    source: str | Any,
    stats: Mapping[str, Any],
    *,
    client: Any = None,
    samples: int | None = None,
    start: int = 0,
    batch_size: int = 32,
    shard_samples: int | None = None,
    weights: str | None = None,
    device: str | None = None,
    seed: int = 0,
    progress: bool = True,
    desc: str = "tally shards",
) -> Consumers:
    """Run the model over shards of the source (one task per shard) and merge the stats.

    ``model`` and ``source`` are specs (built on each worker with
    :func:`nethook.load_model` / :func:`nethook.plugins.get_source`) or objects (shipped
    to the workers). Shards hold ``shard_samples`` samples (default: 8 batches),
    rounded to whole batches. ``desc`` labels the progress bar (one step per shard).
    """
    stats = _check_stat_consumers(stats)
    total = samples if samples is not None else len(_build_source(source)) - start
    shard = max(batch_size, (shard_samples or 8 * batch_size) // batch_size * batch_size)
    tasks = [
        (model, weights, source, stats, a, min(shard, start + total - a), batch_size, device, seed)
        for a in range(start, start + total, shard)
    ]
    return _reduce(tasks, _tally_shard, client, progress, desc)


def _tally_shard(
    model: Any,
    weights: str | None,
    source: Any,
    protos: Consumers,
    start: int,
    samples: int,
    batch_size: int,
    device: str | None,
    seed: int,
) -> Consumers:
    """One task: fresh consumers fed one shard of the source through the model."""
    net = _build_model(model, weights, device, seed)
    consumers = copy.deepcopy(protos)
    run(
        net,
        _build_source(source),
        consumers,
        start=start,
        samples=samples,
        batch_size=batch_size,
        progress=False,
    )
    return consumers


# ---- recording ------------------------------------------------------------------------


def record(
    model: str | torch.nn.Module,
    source: str | Any,
    layers: Sequence[str],
    out: str | os.PathLike,
    *,
    client: Any = None,
    samples: int | None = None,
    start: int = 0,
    batch_size: int = 32,
    dtype: str = "float32",
    weights: str | None = None,
    seed: int = 0,
    block_samples: int | None = None,
    chunk_samples: int | None = None,
    compressor: str | None = None,
    blocks_per_task: int | None = None,
    num_workers: int = 0,
    device: str | None = None,
    storage_options: dict | None = None,
    progress: bool = True,
) -> ActivationStore:
    """Record ``layers`` of ``model`` over ``source`` into the store ``out``; resume if it exists.

    Locally one :func:`~nethook.runner.run` feeds a :class:`~nethook.runner.StoreWriter`.
    With a client, the store is created here (one sample's forward pass gives the
    shapes) and every task records whole blocks of its shard into the shared store,
    which must be on storage all workers reach. Either way a rerun writes only the
    blocks still missing, and the identity (model, weight hash, layers, source,
    fingerprint, seed, dtype) must match the store's.
    """
    net = _build_model(model, weights, device, seed)
    src = _build_source(source)
    total = len(src) - start if samples is None else min(int(samples), len(src) - start)
    attrs = provenance(model, net, source, src, seed)
    resolved = _resolve_layers(net, layers)
    options = {
        "samples": total,
        "dtype": dtype,
        "attrs": attrs,
        "sample_ids": np.arange(start, start + total),
        "block_samples": block_samples,
        "chunk_samples": chunk_samples,
        "compressor": compressor,
        "storage_options": storage_options,
    }
    client = get_client(client)
    if client is None:
        writer = StoreWriter(out, resolved, **options)
        run(
            net,
            src,
            {"store": writer},
            start=start,
            samples=total,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            progress=progress,
            desc=f"recording {os.fspath(out)}",
        )
        return ActivationStore.open(out, storage_options=storage_options)
    StoreWriter(out, resolved, **options)  # refuses a mismatched store before any work
    shapes = layer_shapes(net, src, resolved, start=start)
    store = ActivationStore.open_or_create(out, layers=shapes, **options)
    per_task = blocks_per_task or max(1, -(-(8 * batch_size) // store.block_samples))
    missing = set(store.missing_blocks().tolist())
    tasks = []
    for group in _groups(range(store.n_blocks), per_task):
        if missing.intersection(group):
            a = store.block_range(group[0])[0]
            b = store.block_range(group[-1])[1]
            tasks.append(
                (
                    model,
                    weights,
                    source,
                    os.fspath(out),
                    resolved,
                    options,
                    a,
                    b - a,
                    start,
                    batch_size,
                    seed,
                    device,
                )
            )
    futures = [client.submit(_record_shard, *t, pure=False) for t in tasks]
    from distributed import as_completed

    for future in tqdm(
        as_completed(futures), total=len(futures), desc="recording shards", disable=not progress
    ):
        future.result()
    return ActivationStore.open(out, storage_options=storage_options)


def _record_shard(
    model: Any,
    weights: str | None,
    source: Any,
    out: str,
    layers: Sequence[str],
    options: dict,
    offset: int,
    span: int,
    start: int,
    batch_size: int,
    seed: int,
    device: str | None,
) -> int:
    """One task: record store samples ``offset .. offset+span`` (whole blocks)."""
    net = _build_model(model, weights, device, seed)
    writer = StoreWriter(out, layers, offset=offset, span=span, **options)
    run(
        net,
        _build_source(source),
        {"store": writer},
        start=start + offset,
        samples=span,
        batch_size=batch_size,
        seed=seed,
        progress=False,
    )
    return span


def provenance(
    model: Any, net: torch.nn.Module, source: Any, src: Any, seed: int
) -> dict[str, Any]:
    """The attrs a store records: model spec, weight hash, source spec, fingerprint, seed."""
    return {
        "model": model if isinstance(model, str) else type(net).__qualname__,
        "model_hash": _hash_model(net),
        "source": source if isinstance(source, str) else type(src).__qualname__,
        "source_fingerprint": src.fingerprint() if hasattr(src, "fingerprint") else None,
        "seed": seed,
    }


def _hash_model(net: torch.nn.Module) -> str | None:
    try:
        from nethook.hashing import hash_model
    except ImportError:
        return None
    return hash_model(net)


def _resolve_layers(net: torch.nn.Module, layers: Sequence[str] | str) -> list[str]:
    from nethook.layers import resolve_layers

    names = [layers] if isinstance(layers, str) else list(layers)
    return list(resolve_layers(net, names))


def _build_model(
    model: Any, weights: str | None, device: str | None, seed: int = 0
) -> torch.nn.Module:
    """Build a model spec; random initial weights come from ``seed``, so reruns agree."""
    if isinstance(model, str):
        from nethook.models import load_model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = load_model(model, weights)
    return model.to(device) if device is not None else model


def _build_source(source: Any) -> Any:
    if isinstance(source, str):
        from nethook.plugins import get_source

        return get_source(source)
    return source


def _groups(items: Iterable[int], size: int) -> list[list[int]]:
    items = list(items)
    if size < 1:
        raise ValueError(f"blocks per task must be >= 1, got {size}")
    return [items[i : i + size] for i in range(0, len(items), size)]
