"""``nethook invert``: reconstruct real images with a generator (layer-wise inversion).

::

    nethook invert --generator nethook.gan.generator:scene_gan --layer layer2 \\
        --images scenes:n=2000,size=32,seed=1000 --out DIR \\
        [--n 8] [--rich-in tree,car | --fsd FSD_DIR/fsd.nc] [--segmenter scenes-seg]
        [--train-steps 3000,1500,800,400,300 --joint-steps 600] [--z-steps 3000]

Trains (or resumes, from ``DIR/inverters`` or ``--checkpoints``) the layer-wise
encoder (or loads the one shipped for these generator weights, when no training
steps are given), then inverts ``n`` images (``--z-steps``: refine ``z = E(x)``
first): the first ``n`` of the source, or those
richest in ``--rich-in`` classes or in the classes an ``nethook fsd`` result
marks as dropped. Writes ``DIR/inversion.pt`` (indices, z, r, reconstructions)
and ``DIR/index.html``: real | reconstruction | (with a segmenter) both
segmentations.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

DEFAULT_GENERATOR = "nethook.gan.generator:scene_gan"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``invert`` subcommand."""
    parser = subparsers.add_parser(
        "invert",
        help="invert images into a generator layer (layer-wise encoder + per-image optimization)",
        description=__doc__.split("::")[0].strip(),
    )
    parser.add_argument("--generator", default=DEFAULT_GENERATOR, help="generator spec")
    parser.add_argument("--weights", help="weights file for the generator")
    parser.add_argument("--layer", required=True, help="split layer, e.g. layer2")
    parser.add_argument("--images", required=True, help="image / concept source spec")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--n", type=int, default=8, help="images to invert")
    pick = parser.add_mutually_exclusive_group()
    pick.add_argument("--rich-in", help="comma-separated classes: invert images rich in them")
    pick.add_argument("--fsd", type=Path, help="fsd.nc of `nethook fsd`: use its dropped classes")
    parser.add_argument("--segmenter", help="segmenter spec (needed by --rich-in/--fsd)")
    parser.add_argument("--scan", type=int, default=200, help="images scanned for --rich-in")
    parser.add_argument("--checkpoints", type=Path, help="inverter checkpoints (OUT/inverters)")
    parser.add_argument(
        "--train-steps",
        help="steps per inverter: one number, or one per stage comma-separated (default: the "
        "shipped encoder's settings for these generator weights, else 2000)",
    )
    parser.add_argument("--joint-steps", type=int, help="joint fine-tune steps (default 1000)")
    parser.add_argument("--steps", type=int, default=300, help="per-image optimization steps")
    parser.add_argument(
        "--z-steps", type=int, default=0, help="first refine z = E(x) by this many steps"
    )
    parser.add_argument("--z-lr", type=float, default=0.1, help="rate of the z refinement")
    parser.add_argument(
        "--features", default="nethook.demo.scene_cnn:scene_cnn", help="perceptual net or 'none'"
    )
    parser.add_argument("--feature-layer", default="block2", help="layer of the perceptual net")
    parser.add_argument("--lambda-v", type=float, default=1.0, help="perceptual weight")
    parser.add_argument("--lambda-reg", type=float, default=1.0, help="delta regularizer weight")
    parser.add_argument("--device", help="torch device (default: cpu)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def _classes(args: argparse.Namespace) -> list[str] | None:
    if args.rich_in:
        return [c.strip() for c in args.rich_in.split(",") if c.strip()]
    if args.fsd:
        from nethook.fsd import load_dataset

        ds = load_dataset(args.fsd)
        dropped = [str(c) for c in ds["concept"].values[ds["dropped"].values]]
        if not dropped:
            order = ds["mean_real"].values / (ds["mean_generated"].values + 1e-6)
            dropped = [str(ds["concept"].values[order.argmax()])]
        return dropped
    return None


def settings_from(args: argparse.Namespace, generator: Any) -> Any:
    """The encoder's TrainSettings: as given, else those of a shipped encoder, else defaults."""
    from dataclasses import replace

    from nethook.invert import TrainSettings, shipped_settings

    if args.train_steps is None and args.joint_steps is None:
        return shipped_settings(generator) or TrainSettings()
    settings = TrainSettings()
    if args.train_steps is not None:
        try:
            counts = tuple(int(v) for v in args.train_steps.split(","))
        except ValueError:
            raise ValueError(
                f"--train-steps must be a number or comma-separated numbers, got {args.train_steps!r}"
            ) from None
        settings = replace(settings, steps=counts[0] if len(counts) == 1 else counts)
    if args.joint_steps is not None:
        settings = replace(settings, joint_steps=args.joint_steps)
    return settings


def run(args: argparse.Namespace) -> int:
    """Train/resume the encoder and invert the images described by ``args``."""
    import torch

    from nethook.fsd import real_batches
    from nethook.invert import (
        Chain,
        FeatureNet,
        check_image_size,
        invert,
        omission_page,
        rich_in,
        train_encoder,
    )
    from nethook.models import load_model
    from nethook.plugins import get_segmenter, get_source

    progress = not args.quiet
    try:
        generator = load_model(args.generator, weights=args.weights).eval()
        device = torch.device(args.device or "cpu")
        generator.to(device)
        source = get_source(args.images)
        segmenter = get_segmenter(args.segmenter) if args.segmenter else None
        classes = _classes(args)
        if classes is not None and segmenter is None:
            raise ValueError("--rich-in/--fsd need --segmenter to find the images")
        if classes is not None:
            indices = rich_in(source, segmenter, classes, args.n, scan=args.scan)
        else:
            indices = list(range(min(args.n, len(source))))
        images = next(iter(real_batches(source, indices, len(indices), device)))
        check_image_size(Chain(generator), images)  # before any training
        settings = settings_from(args, generator)
        encoder = train_encoder(
            generator, settings=settings,
            checkpoint_dir=args.checkpoints or args.out / "inverters", progress=progress,
        )  # fmt: skip
        features = None
        if args.features.lower() != "none" and args.lambda_v:
            features = FeatureNet(args.features, args.feature_layer).to(device)
        result = invert(
            generator, encoder, images, args.layer, features=features, lambda_v=args.lambda_v,
            lambda_reg=args.lambda_reg, steps=args.steps, z_steps=args.z_steps, z_lr=args.z_lr,
            progress=progress,
        )  # fmt: skip
    except (ValueError, LookupError, FileNotFoundError) as exc:
        print(f"nethook invert: error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    saved = {"indices": torch.tensor(indices), "z": result.z.cpu(), "r": result.r.cpu(),
             "reconstruction": result.x.cpu(), "layer": args.layer}  # fmt: skip
    _save(saved, args.out / "inversion.pt")
    index = omission_page(images, result.x, segmenter, args.out)
    err = (result.x - images).abs().flatten(1).mean(1)
    for i, e in zip(indices, err.tolist(), strict=True):
        print(f"image {i}: mean |x - G(r)| = {e:.4f}")
    print(f"report: {index}", file=sys.stderr)
    return 0


def _save(obj: dict, path: Path) -> None:
    import torch

    from nethook.atomic import atomic_path

    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(obj, tmp)
