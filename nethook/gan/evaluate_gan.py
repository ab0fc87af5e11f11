"""Measure the demo generator for its model card: FSD against real scenes.

    python -m nethook.gan.evaluate_gan [--weights nethook/gan/scene_gan.pt] [--n 1000]

Segments ``n`` generated images and ``n`` held-out real scenes (seed 1000) with the
``scenes-seg`` segmenter and prints (and writes beside the weights as JSON) the
Fréchet Segmentation Distance between them, the FSD between two disjoint real
sets as the floor, and the mean object-class shares of both.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from nethook.fsd import class_fractions, class_table, segment_statistics, stat_distance
from nethook.gan.data import render
from nethook.gan.generator import WEIGHTS, sample_z, scene_gan


def evaluate(weights: Path, n: int = 1000, batch: int = 100) -> dict:
    """FSD figures and class shares of the generator at ``weights``."""
    from nethook_plugins.scenes_segmenter import ScenesSegmenter

    seg = ScenesSegmenter(parts=False)
    gen = scene_gan(weights)
    z = sample_z(n, seed=12345)
    with torch.no_grad():
        fake = [gen(z[i : i + batch]) for i in range(0, n, batch)]
    real_a = render(n, 32, 1000, progress=False)["image"].float() / 255
    real_b = render(n, 32, 2000, progress=False)["image"].float() / 255
    split = lambda x: [x[i : i + batch] for i in range(0, len(x), batch)]  # noqa: E731
    table = class_table(seg)
    ids, names = table["id"].tolist(), table["name"].tolist()
    stats = {
        "fake": segment_statistics(seg, fake, ids),
        "real": segment_statistics(seg, split(real_a), ids),
        "real2": segment_statistics(seg, split(real_b), ids),
    }

    def dist(a: str, b: str) -> float:
        return stat_distance(stats[a], stats[b])

    shares = {
        "generated": dict(
            zip(names, class_fractions(seg, torch.cat(fake), ids).mean(0).tolist(), strict=True)
        ),
        "real": dict(zip(names, class_fractions(seg, real_a, ids).mean(0).tolist(), strict=True)),
    }
    return {
        "samples": n,
        "fsd_generated_vs_real": dist("fake", "real"),
        "fsd_real_vs_real": dist("real2", "real"),
        "object_shares": {k: {c: round(v, 4) for c, v in d.items()} for k, d in shares.items()},
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--n", type=int, default=1000)
    args = parser.parse_args(argv)
    facts = evaluate(args.weights, args.n)
    out = args.weights.with_suffix(".json")
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(facts, indent=1))
    tmp.replace(out)
    print(json.dumps(facts, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
