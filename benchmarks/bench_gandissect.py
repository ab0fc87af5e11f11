"""Benchmark: GAN dissection of one layer vs the bare forward passes it needs.

    .venv/bin/python benchmarks/bench_gandissect.py [--samples 300 500] [--layer layer2]

``gandissect`` generates and segments 2 x ``samples`` images (threshold sample and
report sample); the gallery images are kept from the report pass, not generated
again. The baseline runs exactly those generator and segmenter forward passes
with nothing else; the ratio is the overhead of the tracing, upsampling and
statistics (goal <= 1.5x). Both run alternately in one process, ``--repeats``
times each, and the best of each is compared (the machine is shared: the best
run is the least disturbed); wall time and process CPU time (all threads; less
disturbed by other processes on a shared machine) are both reported. ``--search-steps`` > 0 also times steps of the
causal unit search (``benchmarks/bench_ace.py`` times a whole ``nethook ace``).
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
from nethook_plugins.scenes_segmenter import ScenesSegmenter

from nethook.causal import insertion_constant, search_causal_units
from nethook.gan.generator import scene_gan
from nethook.gandissect import gandissect, sample_z


def bare(generator, segmenter, n: int, seeds: tuple[int, int], batch: int) -> None:
    """The generator and segmenter passes of a dissection, and nothing else."""
    with torch.no_grad():
        for seed in seeds:
            z_all = sample_z(generator, n, seed)
            for i in range(0, n, batch):
                segmenter.segment(generator(z_all[i : i + batch]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[300, 500])
    parser.add_argument("--layer", default="layer2")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concept", default="sky")
    parser.add_argument("--search-steps", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(0)
    gen, seg = scene_gan(), ScenesSegmenter()
    print(
        f"layer {args.layer}, batch {args.batch}, best of {args.repeats}, {torch.get_num_threads()} threads"
    )
    for n in args.samples:
        wall: dict[str, list[float]] = {"bare": [], "gandissect": []}
        cpu: dict[str, list[float]] = {"bare": [], "gandissect": []}
        runs = {
            "bare": functools.partial(bare, gen, seg, n, (0, 1), args.batch),
            "gandissect": functools.partial(
                gandissect, gen, args.layer, seg, n=n, batch_size=args.batch, progress=False
            ),
        }
        for _ in range(args.repeats):
            for name, run in runs.items():
                t, c = time.perf_counter(), time.process_time()
                run()
                wall[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
        print(f"{n} + {n} samples")
        for label, times in (("wall", wall), ("cpu", cpu)):
            b, g = min(times["bare"]), min(times["gandissect"])
            pairs = zip(times["bare"], times["gandissect"], strict=True)
            each = ", ".join(f"{g_ / b_:.2f}" for b_, g_ in pairs)
            print(
                f"  {label:>4}: bare passes {b:7.2f} s, gandissect {g:7.2f} s, "
                f"ratio {g / b:.2f}x (goal <= 1.5x; per repeat: {each})"
            )
    if args.search_steps > 0:
        k = insertion_constant(gen, args.layer, seg, args.concept, n=100)
        t = time.perf_counter()
        search_causal_units(
            gen, args.layer, seg, args.concept, k, epochs=1,
            steps_per_epoch=args.search_steps, batch_size=16, progress=False,
        )  # fmt: skip
        s = time.perf_counter() - t
        print(
            f"  causal search ({args.concept}): {s:.2f} s for {args.search_steps} steps of 16 z "
            f"({s / args.search_steps:.3f} s/step)"
        )


if __name__ == "__main__":
    main()
