"""Benchmark: how well layer-wise inversion recovers z, r and x, beside the thesis's figures.

    .venv/bin/python benchmarks/bench_invert.py [--layer layer1] [--n 8] [--steps 300]
        [--lr 0.01] [--z-steps 3000] [--z-lr 0.1]
        [--train-steps S | S1,S2,...] [--joint-steps J]
        [--checkpoints DIR] [--threads 1]

On ``--n`` images the demo generator (``scene_gan``, shipped weights) makes from
latents of seed 10000 (never a training seed), the correlation with the truth of
the recovered ``z``, ``r`` (at ``--layer``) and ``x`` for (a) optimizing ``z``
directly, (b) the layer-wise encoder alone, (c) the full method (``z0 = E(x)``,
then per-layer perturbations ``delta_i``) and (c+z) the full method with
``z = E(x)`` first refined by ``--z-steps`` steps of direct optimization.
Correlations are pooled over every value of every image (units x pixels x
images, as the thesis measures them), with the mean per-image correlation beside
them. The perceptual network is the demo scene CNN. Also printed: how many
directions of ``r`` the image reveals at all (the Jacobian of ``G_f``).

The encoder is the one shipped with nethook for the generator's weights (loaded,
no training) unless ``--train-steps``/``--joint-steps`` ask for other settings;
then it is trained here, with checkpoints under ``--checkpoints`` (resumed when
rerun). Everything is seeded: reruns print the same figures up to thread-count
round-off.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from nethook.invert import (
    FeatureNet,
    TrainSettings,
    inversion_correlations,
    shipped_settings,
    train_encoder,
)

THESIS_R = {"z_optimization": "", "encoder": "0.955", "full": "> 0.99", "full_z": ""}
LABELS = {
    "z_optimization": "(a) optimize z",
    "encoder": "(b) encoder alone",
    "full": "(c) full method",
    "full_z": "(c+z) z refined, then (c)",
}


def identifiable_directions(generator, layer: str, seed: int = 10_000) -> tuple[int, int, int]:
    """How many directions of ``r`` at ``layer`` the image reveals, on one generated image.

    The singular values of the Jacobian ``dx/dr`` of ``G_f``: returns the counts
    above 1% and 0.1% of the largest, and the dimension of ``r``.
    """
    from nethook.invert import Chain

    chain = Chain(generator)
    k = chain.index(layer) + 1
    with torch.no_grad():
        r = chain.representations(chain.sample_z(1, seed))[k]
    jac = torch.autograd.functional.jacobian(
        lambda v: chain.forward_from(v, k).flatten(), r, vectorize=True
    ).reshape(-1, r.numel())
    sv = torch.linalg.svdvals(jac)
    return int((sv > 1e-2 * sv[0]).sum()), int((sv > 1e-3 * sv[0]).sum()), r.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", default="layer1")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--train-steps", help="per stage: N or N1,N2,... (default: shipped)")
    parser.add_argument("--joint-steps", type=int)
    parser.add_argument("--z-steps", type=int, default=3000)
    parser.add_argument("--z-lr", type=float, default=0.1)
    parser.add_argument("--checkpoints", default="/tmp/nethook-bench-invert")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from nethook.gan.generator import scene_gan

    generator = scene_gan()
    settings = shipped_settings(generator) or TrainSettings()
    if args.train_steps:
        counts = tuple(int(v) for v in args.train_steps.split(","))
        settings = replace(settings, steps=counts[0] if len(counts) == 1 else counts)
    if args.joint_steps is not None:
        settings = replace(settings, joint_steps=args.joint_steps)
    start = time.perf_counter()
    encoder = train_encoder(generator, settings=settings, checkpoint_dir=args.checkpoints,
                            progress=not args.quiet)  # fmt: skip
    trained = time.perf_counter() - start
    start = time.perf_counter()
    table = inversion_correlations(generator, encoder, args.layer, n=args.n,
                                   features=FeatureNet(), steps=args.steps, lr=args.lr,
                                   z_steps=args.z_steps, z_lr=args.z_lr)  # fmt: skip
    took = time.perf_counter() - start

    print(
        f"Inversion of the demo generator scene_gan, r at {args.layer}, {args.n} generated images"
    )
    print(f"  encoder: {settings.steps} steps per stage + {settings.joint_steps} joint, batch "
          f"{settings.batch_size}, lr {settings.lr} cosine={settings.cosine}, "
          f"lambda_g {settings.lambda_g} ({trained:.0f} s here: loaded if shipped or resumed)")  # fmt: skip
    print(f"  per-image optimization: {args.steps} Adam steps of delta, lr {args.lr}; (c+z) "
          f"first {args.z_steps} steps of z at lr {args.z_lr}; (a) {args.steps + args.z_steps} "
          f"steps of z from 0 at lr {args.z_lr} "
          f"({took:.0f} s for all)")  # fmt: skip
    above2, above3, dim = identifiable_directions(generator, args.layer)
    print(f"  r at {args.layer} has {dim} values; the image reveals {above2} directions of it "
          f"(singular values of dx/dr above 1% of the largest; {above3} above 0.1%)")  # fmt: skip
    print("  correlation with the truth, pooled over images x units x pixels (per-image mean):")
    print(f"  {'':28s} {'z':>15s} {'r':>15s} {'x':>15s}   thesis r")
    for approach in table["approach"].values:
        row = table.sel(approach=approach)
        cells = [
            f"{row.sel(quantity=q, measure='pooled').item():.4f} "
            f"({row.sel(quantity=q, measure='per_image').item():.4f})"
            for q in ("z", "r", "x")
        ]
        print(f"  {LABELS[str(approach)]:28s} " + " ".join(f"{c:>15s}" for c in cells)
              + f"   {THESIS_R[str(approach)]}")  # fmt: skip


if __name__ == "__main__":
    main()
