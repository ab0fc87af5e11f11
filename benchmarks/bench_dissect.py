"""Network Dissection vs bare forward passes over the same images (demo model, scenes).

    .venv/bin/python benchmarks/bench_dissect.py [--images 2000] [--small 500] [--batch-size 50]

Runs, each in a fresh subprocess (so peak memory is per run), side by side:

- ``forward``: the demo model over the scenes source, batch by batch, same batch size,
  same DataLoader, images rendered by the source as they are read;
- ``dissect``: ``nethook.dissect.dissect`` of all four blocks (two passes through the
  runner plus the gallery pass over the top images);

once for ``--images`` and once for ``--small`` images. Prints wall times, the ratio
dissect / forward (goal <= 1.5) and the peak resident memory of each run (which must
not grow with the number of images). Timings on a shared machine are noisy: compare
the ratios measured in one run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

LAYERS = ["block1", "block2", "block3", "block4"]
MODEL = "nethook.demo.scene_cnn:scene_cnn"


def child(mode: str, images: int, batch_size: int) -> dict:
    """Run one measurement in this process and return its figures."""
    import torch
    from torch.utils.data import DataLoader

    from nethook.dissect import dissect
    from nethook.models import load_model
    from nethook.plugins import get_source

    torch.set_num_threads(2)
    source = get_source(f"scenes:n={images},size=64,seed=777,progress=false")
    model = load_model(MODEL)
    source.concepts()  # the frequency table is a one-off cost of the source, not of either
    start = time.perf_counter()
    if mode == "forward":
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in source.normalization)
        loader = DataLoader(source, batch_size=batch_size, collate_fn=source.collate)
        with torch.no_grad():
            for batch in loader:
                model((batch["image"] - mean) / std)
    else:
        dissect(model, LAYERS, source, batch_size=batch_size, progress=False)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "images": images, "seconds": wall, "peak_mib": peak}


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
    parser.add_argument("--child", choices=["forward", "dissect"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.images, args.batch_size)))
        return
    rows = {}
    for n in (args.small, args.images):
        for mode in ("forward", "dissect"):
            rows[mode, n] = measure(mode, n, args.batch_size)
            r = rows[mode, n]
            print(
                f"{mode:8s} {n:6d} images: {r['seconds']:8.1f} s  peak {r['peak_mib']:7.0f} MiB",
                flush=True,
            )
    for n in (args.small, args.images):
        ratio = rows["dissect", n]["seconds"] / rows["forward", n]["seconds"]
        print(f"dissect / forward at {n} images: {ratio:.2f}x (goal <= 1.5x)")
    growth = rows["dissect", args.images]["peak_mib"] / rows["dissect", args.small]["peak_mib"]
    print(f"dissect peak memory, {args.images} vs {args.small} images: {growth:.2f}x (goal ~1.0)")


if __name__ == "__main__":
    main()
