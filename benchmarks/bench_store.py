"""Activation store throughput, measured side by side in one run.

1. Writing activations shaped like (256, 512, 28, 28) into an ActivationStore (zarr v3
   blocks + fsync + checksum + manifest) against ``np.save`` of the same bytes to the same
   disk with fsync (the ceiling; goal >= 70%), for float32 and float16. Both the direct
   block writes and the runner's background StoreWriter path are timed.
2. A second pass over a store against recomputing the forward pass, feeding the same
   consumers (Mean and Variance of a ResNet-18 layer).

    .venv/bin/python benchmarks/bench_store.py [--samples 256] [--repeats 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nethook.runner import Batch, StatConsumer, StoreWriter, run, run_store
from nethook.stats.moments import Mean, Variance
from nethook.store import ActivationStore, to_storage


def time_np_save(data: np.ndarray, where: Path) -> float:
    path = where / "ceiling.npy"
    t = time.perf_counter()
    with open(path, "wb") as f:
        np.save(f, data)
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - t
    path.unlink()
    return elapsed


CREATE_SECONDS: list[float] = []


def time_store_blocks(data: np.ndarray, where: Path, dtype: str, **options) -> float:
    """Direct write_block calls: the store's steady-state cost (data in storage dtype).

    The one-time creation of the store (metadata, fsynced) is timed apart, in
    ``CREATE_SECONDS``: it does not grow with the data.
    """
    path = where / "blocks.zarr"
    t = time.perf_counter()
    store = ActivationStore.create(
        path, layers={"layer": data.shape[1:]}, samples=len(data), dtype=dtype, **options
    )
    CREATE_SECONDS.append(time.perf_counter() - t)
    t = time.perf_counter()
    for block in range(store.n_blocks):
        start, stop = store.block_range(block)
        store.write_block(block, {"layer": data[start:stop]}, background=True)
    store.flush()
    elapsed = time.perf_counter() - t
    shutil.rmtree(path)
    return elapsed


def time_store_writer(acts: torch.Tensor, where: Path, dtype: str, batch: int = 32) -> float:
    """The runner's path: float32 batches handed to a StoreWriter (cast + write in a thread).

    Timed end to end: store creation, casting into block buffers, writes, fsyncs.
    """
    path = where / "writer.zarr"
    t = time.perf_counter()
    writer = StoreWriter(path, "layer", samples=len(acts), dtype=dtype)
    for start in range(0, len(acts), batch):
        chunk = acts[start : start + batch]
        writer(Batch({"layer": chunk}, None, torch.arange(len(chunk)), start, start // batch))
    writer.close()
    elapsed = time.perf_counter() - t
    shutil.rmtree(path)
    return elapsed


def bench_writes(samples: int, repeats: int, where: Path) -> None:
    print(f"== store writes, activations ({samples}, 512, 28, 28), fsynced, median of {repeats}")
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(samples, 512, 28, 28, generator=g)
    print(f"{'dtype':<9}{'variant':<34}{'MB/s':>9}{'vs np.save':>12}  (median of per-round ratios)")
    for dtype in ("float32", "float16"):
        data = to_storage(acts, dtype)
        mb = data.nbytes / 1e6
        variants = {
            "np.save + fsync (ceiling)": lambda d=data: time_np_save(d, where),
            "store, default blocks": lambda d=data, dt=dtype: time_store_blocks(d, where, dt),
            "store, 32-sample blocks": lambda d=data, dt=dtype: time_store_blocks(
                d, where, dt, block_samples=32
            ),
            "store, 1-sample chunks in shards": lambda d=data, dt=dtype: time_store_blocks(
                d, where, dt, block_samples=32, chunk_samples=1
            ),
            "store, zstd": lambda d=data, dt=dtype: time_store_blocks(
                d, where, dt, compressor="zstd"
            ),
            "StoreWriter end to end, batches 32": lambda dt=dtype: time_store_writer(
                acts, where, dt
            ),
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for r in range(repeats):
            # interleaved, and rotated each round, so neither load drift nor the file
            # system's work after the previous variant (freeing a deleted file) favours one
            for name in names[r % len(names) :] + names[: r % len(names)]:
                times[name].append(variants[name]())
        ceiling = times["np.save + fsync (ceiling)"]
        for name, ts in times.items():
            rate = mb / statistics.median(ts)
            # ratio within each round, then the median: robust to a shared disk's drift
            ratio = statistics.median(c / t for c, t in zip(ceiling, ts, strict=True))
            print(f"{dtype:<9}{name:<34}{rate:>9.0f}{ratio:>11.0%}")


def report_creation() -> None:
    if CREATE_SECONDS:
        ms = 1000 * statistics.median(CREATE_SECONDS)
        print(f"(store rows exclude the one-time store creation: median {ms:.0f} ms)")


def bench_second_pass(samples: int, repeats: int, where: Path) -> None:
    import torchvision

    print(f"\n== second pass: Mean + Variance of resnet18 layer2 over {samples} images 3x224x224")
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    images = torch.utils.data.TensorDataset(torch.rand(samples, 3, 224, 224))
    path = where / "pass.zarr"
    writer = StoreWriter(path, "layer2", samples=samples)
    run(model, images, {"store": writer}, batch_size=32, progress=False)

    def consumers():
        return {"mean": StatConsumer(Mean(), "layer2"), "var": StatConsumer(Variance(), "layer2")}

    forward, second = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        a = run(model, images, consumers(), batch_size=32, progress=False)
        forward.append(time.perf_counter() - t)
        t = time.perf_counter()
        b = run_store(path, consumers(), batch_size=32, progress=False)
        second.append(time.perf_counter() - t)
    same = torch.equal(a["var"].stat.variance(), b["var"].stat.variance())
    f, s = statistics.median(forward), statistics.median(second)
    print(f"forward pass (model)   {samples / f:8.1f} samples/s")
    print(f"second pass (store)    {samples / s:8.1f} samples/s   {f / s:.1f}x faster")
    print(f"same Variance state from both passes: {same}")
    shutil.rmtree(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--pass-samples", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", help="where to write (default: a temp dir)")
    args = parser.parse_args()
    where = Path(tempfile.mkdtemp(prefix="bench-store-", dir=args.dir))
    try:
        bench_writes(args.samples, args.repeats, where)
        report_creation()
        bench_second_pass(args.pass_samples, args.repeats, where)
    finally:
        shutil.rmtree(where, ignore_errors=True)


if __name__ == "__main__":
    main()
