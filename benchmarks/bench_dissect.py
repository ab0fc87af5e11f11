"""Network Dissection vs bare forward passes over the same images (demo model, scenes).

    .venv/bin/python benchmarks/bench_dissect.py [--images 2000] [--small 500] [--batch-size 50]
    .venv/bin/python benchmarks/bench_dissect.py --rank-error [--images 1000]

Runs, each in a fresh subprocess (so peak memory is per run), side by side:

- ``forward``: the demo model over the scenes source, batch by batch, same batch size,
  same DataLoader, images rendered by the source as they are read;
- ``dissect``: ``nethook.dissect.dissect`` of all four blocks (two passes through the
  runner plus the gallery pass over the top images);

once for ``--images`` and once for ``--small`` images. Prints wall times, the ratio
dissect / forward (goal <= 1.5), the CPU time of each run (all threads; steadier than
wall time when the cores are shared) and the peak resident memory of each run (which
must not grow with the number of images). One-off costs of a fresh process are paid
before the clock starts in both runs: importing the libraries (zarr, and dask, which
xarray imports at its first array) and the source's concept table. Timings on a shared
machine are noisy: compare the ratios measured in one run; with ``--repeat R`` each
measurement is taken R times, alternating forward and dissect, and the fastest of
each is kept (the run least disturbed by other processes).

The CPU time counts every thread and the forked processes that take a share of each
of dissection's passes (``parallel``, one per core). Peak memory is printed for the
main process and for its child processes (the largest of them: the forked parts; a
fork made by an import may set it too, which is why ``children`` shows about 430 MiB
even for the forward pass). "other processes" is
the CPU time the rest of the machine used during the run (``/proc/stat``): a run with
much of it was disturbed.

``--rank-error`` measures the thresholds' accuracy: per layer, the largest distance
over units between the share of all activations at or above the unit's threshold
and the quantile (0.005), counted exactly over a forward pass.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

LAYERS = ["block1", "block2", "block3", "block4"]
MODEL = "nethook.demo.scene_cnn:scene_cnn"


def child(mode: str, images: int, batch_size: int) -> dict:
    """Run one measurement in this process and return its figures."""
    import torch
    import xarray as xr
    from torch.utils.data import DataLoader

    import nethook.runner  # noqa: F401  (one-off imports, see the module docstring)
    from nethook.dissect import dissect
    from nethook.models import load_model
    from nethook.plugins import get_source

    torch.set_num_threads(2)
    xr.DataArray([0.0])  # xarray imports dask at its first array
    source = get_source(f"scenes:n={images},size=64,seed=777,progress=false")
    model = load_model(MODEL)
    source.concepts()  # the frequency table is a one-off cost of the source, not of either
    start = time.perf_counter()
    cpu = time.process_time() + _children_cpu()
    busy = _machine_busy()
    if mode == "forward":
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in source.normalization)
        loader = DataLoader(source, batch_size=batch_size, collate_fn=source.collate)
        with torch.no_grad():
            for batch in loader:
                model((batch["image"] - mean) / std)
    else:
        dissect(model, LAYERS, source, batch_size=batch_size, progress=False)
    wall = time.perf_counter() - start
    cpu = time.process_time() + _children_cpu() - cpu
    other = max(0.0, _machine_busy() - busy - cpu)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "mode": mode,
        "images": images,
        "seconds": wall,
        "cpu": cpu,
        "other": other,
        "peak_mib": peak,
        "children_mib": children,
    }


def _machine_busy() -> float:
    """CPU seconds the whole machine has been busy (``/proc/stat``; 0 where absent)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    """CPU seconds of this process's finished child processes (dissection's forked parts)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def rank_error(images: int, batch_size: int) -> None:
    """Print the thresholds' exact rank error per layer (max over units)."""
    import numpy as np
    import torch

    from nethook.dissect import dissect
    from nethook.models import load_model
    from nethook.plugins import get_source
    from nethook.runner import FunctionConsumer, run

    torch.set_num_threads(2)
    source = get_source(f"scenes:n={images},size=64,seed=777,progress=false")
    model = load_model(MODEL)
    results = dissect(
        model, LAYERS, source, batch_size=batch_size, progress=False, gallery_size=None, topk=1
    )
    thresholds = {layer: results[layer]["threshold"].values for layer in LAYERS}
    above = dict.fromkeys(LAYERS, 0)
    total = dict.fromkeys(LAYERS, 0)

    def count(batch) -> None:
        for layer in LAYERS:
            maps = batch.acts[layer].numpy()
            total[layer] += maps.shape[0] * maps.shape[2] * maps.shape[3]
            thr = thresholds[layer][None, :, None, None]
            above[layer] = above[layer] + (maps >= thr).sum((0, 2, 3))

    run(model, source, FunctionConsumer(count, LAYERS), batch_size=batch_size, progress=False)
    print(f"rank error of the thresholds at q = 0.005, {images} images (max over units)")
    print(" ".join(f"{layer:>8s}" for layer in LAYERS))
    errors = [float(np.abs(above[layer] / total[layer] - 0.005).max()) for layer in LAYERS]
    print(" ".join(f"{e:8.1e}" for e in errors))


def measure(mode: str, images: int, batch_size: int) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--images",
            str(images),
            "--batch-size",
            str(batch_size),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--small", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; fastest kept")
    parser.add_argument("--child", choices=["forward", "dissect"], help=argparse.SUPPRESS)
    parser.add_argument(
        "--rank-error", action="store_true", help="measure the thresholds' rank error instead"
    )
    args = parser.parse_args()
    if args.rank_error:
        rank_error(args.images, args.batch_size)
        return
    if args.child:
        print(json.dumps(child(args.child, args.images, args.batch_size)))
        return
    rows: dict[tuple[str, int], dict] = {}
    for n in (args.small, args.images):
        for _ in range(args.repeat):
            for mode in ("forward", "dissect"):
                r = measure(mode, n, args.batch_size)
                best = rows.get((mode, n))
                rows[mode, n] = {
                    "seconds": min(r["seconds"], best["seconds"]) if best else r["seconds"],
                    "cpu": min(r["cpu"], best["cpu"]) if best else r["cpu"],
                    "peak_mib": max(r["peak_mib"], best["peak_mib"]) if best else r["peak_mib"],
                    "children_mib": max(r["children_mib"], best["children_mib"])
                    if best
                    else r["children_mib"],
                }
                print(
                    f"{mode:8s} {n:6d} images: {r['seconds']:8.1f} s  cpu {r['cpu']:8.1f} s  "
                    f"peak {r['peak_mib']:6.0f} MiB (children {r['children_mib']:5.0f})  "
                    f"other processes {r['other']:5.1f} cpu s",
                    flush=True,
                )
    for n in (args.small, args.images):
        ratio = rows["dissect", n]["seconds"] / rows["forward", n]["seconds"]
        cpu = rows["dissect", n]["cpu"] / rows["forward", n]["cpu"]
        print(f"dissect / forward at {n} images: {ratio:.2f}x wall, {cpu:.2f}x cpu (goal <= 1.5x)")
    for key, what in (("peak_mib", "main process"), ("children_mib", "forked processes")):
        growth = rows["dissect", args.images][key] / rows["dissect", args.small][key]
        print(f"dissect peak memory ({what}), {args.images} vs {args.small} images: {growth:.2f}x")


if __name__ == "__main__":
    main()
