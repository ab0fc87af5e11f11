"""Benchmark: FSD vs the bare passes it needs; inversion correlations (a)/(b)/(c).

    .venv/bin/python benchmarks/bench_seeing.py [--samples 200] [--layer layer1]
        [--train-steps 500] [--joint-steps 300] [--steps 200] [--n 8] [--checkpoints DIR]

1. ``measure_fsd`` on ``samples`` generated and ``2 x samples`` real images
   against the bare passes it needs (generating ``samples`` images, segmenting
   them and the ``2 x samples`` real ones, nothing else); the ratio is the
   overhead of the share vectors, the Covariance stats and the distance.
   Side by side in one process, alternating order, best of ``--repeats``.
2. Correlation with the truth of recovered z, r (at ``--layer``) and x on
   generated images for (a) optimizing z directly, (b) the layer-wise encoder
   alone, (c) the full method, on the demo generator (``scene_gan``) with the
   demo scene CNN as perceptual network, or on a small random generator when
   the demo weights are missing (said in the output).
"""

from __future__ import annotations

import argparse
import time

import torch

from nethook.fsd import format_fsd, generated_batches, measure_fsd, real_batches
from nethook.invert import FeatureNet, TrainSettings, inversion_correlations, train_encoder


def bare(generator, source, segmenter, n: int, batch: int) -> None:
    """The generator and segmenter passes FSD needs, and nothing else."""
    with torch.no_grad():
        for images in generated_batches(generator, n, batch, seed=0):
            segmenter.segment(images)
        for images in real_batches(source, list(range(2 * n)), batch):
            segmenter.segment(images)


def bench_fsd(args) -> None:
    from nethook_plugins.scenes import Scenes
    from nethook_plugins.scenes_segmenter import ScenesSegmenter

    from nethook.gan.generator import scene_gan

    generator = scene_gan()
    segmenter = ScenesSegmenter(parts=False)
    source = Scenes(n=2 * args.samples, size=32, seed=1000)
    for i in range(min(len(source), 2 * args.samples)):  # render once, outside the timings
        source[i]
    times = {"bare": [], "fsd": []}
    ds = None
    for r in range(args.repeats):
        for name in ("bare", "fsd") if r % 2 == 0 else ("fsd", "bare"):
            start = time.perf_counter()
            if name == "bare":
                bare(generator, source, segmenter, args.samples, args.batch)
            else:
                ds = measure_fsd(generator, source, segmenter, args.samples,
                                 batch_size=args.batch, progress=False)  # fmt: skip
            times[name].append(time.perf_counter() - start)
    b, f = min(times["bare"]), min(times["fsd"])
    print(
        f"FSD, {args.samples} generated + {2 * args.samples} real images (best of {args.repeats})"
    )
    print(f"  bare generator + segmenter passes: {b:.2f} s")
    print(f"  measure_fsd:                       {f:.2f} s   ratio {f / b:.2f}x")
    print(f"  {format_fsd(ds)}")


def bench_inversion(args) -> None:
    try:
        from nethook.gan.generator import scene_gan

        generator, what = scene_gan(), "demo generator scene_gan"
        features = FeatureNet()
    except FileNotFoundError:
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "seeing"))
        from toy import ToyGenerator

        generator, what, features = ToyGenerator(), "small RANDOM generator (no demo weights)", None
    settings = TrainSettings(steps=args.train_steps, joint_steps=args.joint_steps)
    start = time.perf_counter()
    encoder = train_encoder(generator, settings=settings, checkpoint_dir=args.checkpoints,
                            progress=not args.quiet)  # fmt: skip
    trained = time.perf_counter() - start
    start = time.perf_counter()
    table = inversion_correlations(generator, encoder, args.layer, n=args.n, features=features,
                                   steps=args.steps)  # fmt: skip
    took = time.perf_counter() - start
    print(f"\nInversion on the {what}, split at {args.layer}, {args.n} generated images")
    print(f"  encoder: {args.train_steps} steps per stage + {args.joint_steps} joint "
          f"({trained:.0f} s, less when resumed from {args.checkpoints})")  # fmt: skip
    print(f"  per-image optimization: {args.steps} steps ({took:.0f} s for (a) + (c))")
    print("  correlation with the truth (thesis: encoder r 0.955, full > 0.99):")
    print(table.to_pandas().round(4).to_string())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layer", default="layer1")
    parser.add_argument("--train-steps", type=int, default=500)
    parser.add_argument("--joint-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--checkpoints", default="/tmp/nethook-bench-seeing")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-fsd", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.skip_fsd:
        bench_fsd(args)
    bench_inversion(args)


if __name__ == "__main__":
    main()
