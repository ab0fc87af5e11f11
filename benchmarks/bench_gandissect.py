"""Benchmark: GAN dissection of one layer vs the bare forward passes it needs.

    .venv/bin/python benchmarks/bench_gandissect.py [--samples 300 500] [--layer layer2]

``gandissect`` generates and segments 2 x ``samples`` images (threshold sample and
report sample); the gallery images are kept from the report pass, not generated
again. The baseline runs exactly those generator and segmenter forward passes
with nothing else; the ratio is the overhead of the tracing, upsampling and
statistics (goal <= 1.5x). Both run alternately in one process, ``--repeats``
times each, and the best of each is compared (the machine is shared: the best
run is the least disturbed); wall time and process CPU time (all threads; less
disturbed by other processes on a shared machine) are both reported. Finally, per
repeat, gandissect's time over the time spent inside its own generator and
segmenter calls: the overhead measured batch by batch within one run, the figure
least disturbed by load swings (gandissect updates its statistics on a worker
thread while the next batch is generated, which slows its own passes a little, so
this ratio reads somewhat lower than the comparison with the bare passes). ``--search-steps`` > 0 also times steps of the
causal unit search (``benchmarks/bench_ace.py`` times a whole ``nethook ace``).
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
from nethook_plugins.scenes_segmenter import ScenesSegmenter

from nethook import gandissect as gd
from nethook.causal import insertion_constant, search_causal_units
from nethook.gan.generator import scene_gan
from nethook.gandissect import gandissect, sample_z


class PassTimer:
    """Wall and CPU seconds spent inside ``nethook.gandissect.generate`` (the generator
    and segmenter passes) during a dissection: the rest is its overhead, measured
    batch by batch in the same run, so load swings of a shared machine hit both."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0
        self.inner = gd.generate

    def __call__(self, *args, **kwargs):
        t, c = time.perf_counter(), time.process_time()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.wall += time.perf_counter() - t
            self.cpu += time.process_time() - c


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
        inside: list[tuple[float, float]] = []
        for _ in range(args.repeats):
            for name, run in runs.items():
                timer = gd.generate = PassTimer()
                t, c = time.perf_counter(), time.process_time()
                try:
                    run()
                finally:
                    gd.generate = timer.inner
                wall[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
                if name == "gandissect":
                    inside.append((wall[name][-1] / timer.wall, cpu[name][-1] / timer.cpu))
        print(f"{n} + {n} samples")
        for label, times in (("wall", wall), ("cpu", cpu)):
            b, g = min(times["bare"]), min(times["gandissect"])
            pairs = zip(times["bare"], times["gandissect"], strict=True)
            each = ", ".join(f"{g_ / b_:.2f}" for b_, g_ in pairs)
            print(
                f"  {label:>4}: bare passes {b:7.2f} s, gandissect {g:7.2f} s, "
                f"ratio {g / b:.2f}x (goal <= 1.5x; per repeat: {each})"
            )
        w = ", ".join(f"{a:.2f}" for a, _ in inside)
        c = ", ".join(f"{b:.2f}" for _, b in inside)
        print(f"  gandissect / its own generator + segmenter passes: wall {w}; cpu {c}")
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
