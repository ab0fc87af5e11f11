"""How fast the scenes source makes images on one core (target: >= 500 images/s at 128 x 128).

Run: ``.venv/bin/python benchmarks/bench_scenes.py [--n 600] [--sizes 64 128 256]``

Measures, in one run and on one thread: the full item (layout + render + noise +
tensors), the layout alone, the render alone and batches through a single-process
DataLoader. Prints images/s by wall clock and by process CPU time (the latter is
less disturbed by other processes sharing the machine) and the ratio to the
500 images/s target.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from nethook_plugins.scenes import Scenes
from nethook_plugins.scenes.layout import render
from torch.utils.data import DataLoader

TARGET = 500.0


def rate(fn: Callable[[], int]) -> tuple[float, float]:
    """(images/s by wall clock, images/s by CPU time) of ``fn``, which returns its image count."""
    wall, cpu = time.perf_counter(), time.process_time()
    count = fn()
    return count / (time.perf_counter() - wall), count / (time.process_time() - cpu)


def main() -> None:
    """Print the throughput table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=600, help="images per measurement")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = args.n
    print(f"scenes throughput, one thread, {n} images each (target {TARGET:.0f}/s at 128)")
    print(f"{'size':>5} {'what':<22} {'wall img/s':>11} {'cpu img/s':>10} {'cpu/target':>11}")
    for size in args.sizes:
        source = Scenes(n=n, size=size, seed=0, progress=False)
        source[0]  # warm up: imports, noise bank
        layouts = [source.layout(i) for i in range(n)]
        loader = DataLoader(source, batch_size=64, collate_fn=source.collate)
        rows = {
            "item (full)": lambda s=source: sum(1 for i in range(n) if s[i] is not None),
            "layout only": lambda s=source: len([s.layout(i) for i in range(n)]),
            "render only": lambda z=size, ls=layouts: len([render(x, z, z) for x in ls]),
            "DataLoader batch 64": lambda dl=loader: sum(len(b["index"]) for b in dl),
        }
        for what, fn in rows.items():
            wall, cpu = rate(fn)
            print(f"{size:>5} {what:<22} {wall:>11.0f} {cpu:>10.0f} {cpu / TARGET:>10.2f}x")


if __name__ == "__main__":
    main()
