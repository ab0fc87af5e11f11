"""Dissection's pass 2 on CPU: finding the on entries and tallying them, old vs new.

    .venv/bin/python benchmarks/bench_pass2.py [--images 400] [--repeat 5] [--label-dtype uint8]
        [--api flat|cells|on]

Records once the inputs pass 2 tallies in a real run: the demo model
(``nethook.demo.scene_cnn:scene_cnn``) over ``scenes:n=IMAGES,size=64,seed=777`` in
batches of 50, keeping the maps of ``block1`` .. ``block4`` (16x64x64, 32x32x32, 64x16x16,
128x8x8) and the batch's labels (``nethook.dissect.batch_labels``, 64x64; cast to
``--label-dtype``: ``uint8`` is what dissect's default ``pass2="store"`` replays, ``int64``
what a source gives); thresholds are each unit's exact 0.995 quantile of the kept maps.

Then times, side by side in one process, per batch as ``_IoUTally._sparse`` does it:

- ``find``: the on entries of every layer's thresholded, upsampled maps
  (``ThresholdedUpsample.flat_on`` into one mask of all layers' units; with
  ``--api cells`` given the cells pass 1 records, those above a floor at each unit's
  0.98 quantile, found untimed; with ``--api on`` and in the reference,
  ``ThresholdedUpsample.on``);
- ``tally``: adding them to an ``IoU`` stat (``IoU.update_flat``; ``IoU.update_on``);

for the reference code (``nethook/upsample.py`` and ``nethook/stats/iou.py`` as of git
revision ``--reference``, loaded from git into modules of their own) and for the working
tree's code. Each repeat times every batch of both; the fastest repeat of each is kept
(the one least disturbed by other processes on shared cores); on alternate batches
each version runs first, so both see the batch as often with a cold cache. Prints CPU
seconds per 1000 images (process time, all threads) and the speed-up, and checks that
both give identical entries and identical tallies.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["block1", "block2", "block3", "block4"]
MODEL = "nethook.demo.scene_cnn:scene_cnn"
REFERENCE = "bfd030085936c790fcd7dcffebdc4acc3d21edc7"  # before pass 2 was reworked
QUANTILE = 0.995
FLOOR = 0.98  # pass 1 records the cells above such a floor, below the threshold (--api cells)


def reference_module(revision: str, path: str, name: str) -> ModuleType:
    """The module at ``path`` as of git ``revision``, imported under ``name``."""
    source = subprocess.run(
        ["git", "show", f"{revision}:{path}"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, f"{revision[:7]}:{path}", "exec"), module.__dict__)
    return module


def record(images: int, batch_size: int, label_dtype: torch.dtype):
    """Per batch: the layers' maps (numpy), pixel labels and whole-image labels."""
    from nethook.dissect import batch_labels
    from nethook.models import load_model
    from nethook.plugins import get_source
    from nethook.runner import run
    from nethook.upsample import infer_geometry

    source = get_source(f"scenes:n={images},size=64,seed=777,progress=false")
    model = load_model(MODEL)
    batches = []

    class Keep:
        layers = LAYERS

        def __call__(self, batch) -> None:
            labels, image_labels = batch_labels(batch.data, (64, 64), label_dtype)
            maps = {layer: batch.acts[layer].numpy().copy() for layer in LAYERS}
            batches.append((maps, labels, image_labels))

    run(model, source, Keep(), batch_size=batch_size, progress=False)
    geometry = {layer: infer_geometry(model, layer) for layer in LAYERS}
    return batches, geometry, source.concepts()


def exact_thresholds(batches, quantile: float = QUANTILE) -> dict[str, np.ndarray]:
    """Each unit's exact ``quantile`` over all kept maps, float32 (as dissect keeps them)."""
    out = {}
    for layer in LAYERS:
        maps = np.concatenate([b[0][layer] for b in batches])
        rows = maps.transpose(1, 0, 2, 3).reshape(maps.shape[1], -1)
        out[layer] = np.quantile(rows, quantile, axis=1).astype(np.float32)
    return out


class Pass2:
    """Pass 2's tallying with one version of the code, batch by batch, timed.

    ``api``: ``"flat"`` (``flat_on`` and ``IoU.update_flat``, one flat index per
    entry), ``"cells"`` (the same, ``flat_on`` given the cells of pass 1's record),
    or ``"on"`` (``on`` and ``IoU.update_on``, as the reference does).
    """

    def __init__(self, upsample, iou, geometry, thresholds, concepts, shapes, api) -> None:
        self.finders = {
            layer: upsample.ThresholdedUpsample(shapes[layer], (64, 64), (64, 64), geometry[layer])
            for layer in LAYERS
        }
        self.offsets = np.cumsum([0] + [len(thresholds[layer]) for layer in LAYERS])
        self.stat = iou.IoU(int(self.offsets[-1]), concepts)
        self.api = api if hasattr(self.stat, "update_flat") else "on"
        self.thresholds = thresholds
        self.find_seconds = 0.0
        self.tally_seconds = 0.0

    def find(self, maps, cells=None):
        """Every layer's on entries, the units numbered across layers (as ``_sparse``)."""
        found = []
        units = int(self.offsets[-1])
        for k, layer in enumerate(LAYERS):
            finder, thr = self.finders[layer], self.thresholds[layer]
            if self.api == "on":
                image, unit, pixel = finder.on(maps[layer], thr)
                found.append((image, unit + self.offsets[k], pixel))
                continue
            given = cells[layer] if self.api == "cells" else None
            found.append(
                finder.flat_on(maps[layer], thr, units=units, offset=self.offsets[k], cells=given)
            )
        if self.api == "on":
            return tuple(np.concatenate(parts) for parts in zip(*found, strict=True))
        return np.concatenate(found)

    def flat_index(self, entries) -> np.ndarray:
        """The entries as sorted flat indices into ``[N, U, 64, 64]`` (to compare)."""
        if self.api != "on":
            return np.sort(entries)
        image, unit, pixel = entries
        return np.sort((image * int(self.offsets[-1]) + unit) * 4096 + pixel)

    def __call__(self, maps, labels, image_labels, cells):
        start = time.process_time()
        entries = self.find(maps, cells)
        middle = time.process_time()
        if self.api == "on":
            self.stat.update_on(*entries, labels, image_labels)
        else:
            self.stat.update_flat(entries, labels, image_labels)
        self.find_seconds += middle - start
        self.tally_seconds += time.process_time() - middle
        return self.flat_index(entries)


def recorded_cells(maps, floors) -> dict[str, np.ndarray]:
    """The cells of a batch above each unit's floor: what dissect's pass 1 records
    (``_hot_cells``, before it adds the 3 x 3 neighbourhoods of upsampled layers)."""
    return {
        layer: np.flatnonzero(maps[layer] > floors[layer][None, :, None, None]) for layer in LAYERS
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--label-dtype", choices=["uint8", "int64"], default="uint8")
    parser.add_argument("--reference", default=REFERENCE, help="git revision of the old code")
    parser.add_argument(
        "--api",
        choices=["flat", "cells", "on"],
        default="flat",
        help="the new code through flat_on / update_flat (given pass 1's recorded cells: "
        "cells), or through on / update_on",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)

    import nethook.stats.iou as new_iou
    import nethook.upsample as new_upsample

    old_upsample = reference_module(args.reference, "nethook/upsample.py", "_ref_upsample")
    old_iou = reference_module(args.reference, "nethook/stats/iou.py", "_ref_iou")
    batches, geometry, concepts = record(
        args.images, args.batch_size, getattr(torch, args.label_dtype)
    )
    thresholds = exact_thresholds(batches)
    shapes = {layer: batches[0][0][layer].shape[-2:] for layer in LAYERS}
    cells = [None] * len(batches)
    if args.api == "cells":
        floors = exact_thresholds(batches, FLOOR)
        cells = [recorded_cells(b[0], floors) for b in batches]
    images = sum(len(b[1]) for b in batches)
    versions = {"old": (old_upsample, old_iou), "new": (new_upsample, new_iou)}
    best: dict[str, tuple[float, float]] = {}
    stats = {}
    for _ in range(args.repeat):
        runs = {
            name: Pass2(up, iou, geometry, thresholds, concepts, shapes, args.api)
            for name, (up, iou) in versions.items()
        }
        for b, (maps, labels, image_labels) in enumerate(batches):
            order = list(runs.items())[:: 1 if b % 2 else -1]  # each goes first half the time
            entries = {name: p(maps, labels, image_labels, cells[b]) for name, p in order}
            if not np.array_equal(entries["old"], entries["new"]):
                raise AssertionError("old and new code found different on entries")
        for name, p in runs.items():
            seconds = (p.find_seconds, p.tally_seconds)
            if name not in best or sum(seconds) < sum(best[name]):
                best[name] = seconds
            stats[name] = p.stat
    if not all(
        torch.equal(getattr(stats["old"], t), getattr(stats["new"], t)) for t in old_iou._TALLIES
    ):
        raise AssertionError("old and new code tallied differently")

    new = runs["new"]
    found = [new.flat_index(new.find(b[0], c)) for b, c in zip(batches, cells, strict=True)]
    on_share = np.mean([len(f) for f in found]) / (
        args.batch_size * int(runs["new"].offsets[-1]) * 64 * 64
    )
    print(
        f"{images} images, batches of {args.batch_size}, labels {args.label_dtype}, "
        f"{on_share:.2%} of the [N, U, 64, 64] masks on; fastest of {args.repeat} repeats"
    )
    print(f"{'CPU s / 1000 images':<22}{'old':>8}{'new':>8}{'speed-up':>10}")
    scale = 1000 / images
    rows = {
        "find (on)": (best["old"][0], best["new"][0]),
        "tally (update_on)": (best["old"][1], best["new"][1]),
        "sum": (sum(best["old"]), sum(best["new"])),
    }
    for label, (old, new) in rows.items():
        print(f"{label:<22}{old * scale:>8.3f}{new * scale:>8.3f}{old / new:>9.2f}x")
    print("entries and tallies identical: yes")


if __name__ == "__main__":
    main()
