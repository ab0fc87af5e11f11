"""IoU tally throughput: U = 512 units, 200 concepts, 112 x 112 labels, batch 64.

Side by side in one run (median of ``--repeat`` timings each):

- ``IoU.update`` on bool masks and on float32 activations with thresholds;
- ``IoU.update_on`` given the masks' on entries (image, unit, pixel), and with the
  entries found from the activations (``ThresholdedUpsample`` at label resolution:
  compare, then the indices of the on cells), as dissection does on CPU;
- the unavoidable data touch: thresholding the activations into a float mask;
- two alternative formulations of the intersection alone (no areas, no
  conditioning): a dense GEMM against a one-hot over all concepts, and a
  ``index_add_`` scatter of mask columns by label;
- the compact GEMM's worst case: every image carries every concept.

Labels look like Broden's: per image about 10 objects in blocks, sparse parts, a
few colours, one scene label. Run: ``.venv/bin/python benchmarks/bench_iou.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from nethook.stats.iou import IoU
from nethook.upsample import ThresholdedUpsample

CATEGORIES = ["object", "part", "color", "scene"]


def concept_table(concepts: int) -> np.ndarray:
    """Ids 1..concepts split into object (60%), part (25%), color (5%), scene (10%)."""
    bounds = np.cumsum([0, int(0.6 * concepts), int(0.25 * concepts), int(0.05 * concepts)])
    table = np.full(concepts + 1, 3, dtype=np.int64)
    table[0] = -1
    for k in range(3):
        table[1 + bounds[k] : 1 + bounds[k + 1]] = k
    return table


def broden_like_labels(table: np.ndarray, n: int, size: int, seed: int):
    """``[n, 3, size, size]`` pixel labels (object, part, color) and ``[n, 1]`` scenes."""
    rng = np.random.default_rng(seed)
    ids = [np.nonzero(table == k)[0] for k in range(4)]
    block = max(1, size // 8)
    grid = -(-size // block)
    labels = np.zeros((n, 3, size, size), dtype=np.int64)
    for i in range(n):
        objects = rng.choice(ids[0], 10, replace=False)
        layout = rng.choice(objects, (grid, grid))
        labels[i, 0] = np.kron(layout, np.ones((block, block), np.int64))[:size, :size]
        parts = rng.choice(np.concatenate([[0] * 12, rng.choice(ids[1], 4)]), (grid, grid))
        labels[i, 1] = np.kron(parts, np.ones((block, block), np.int64))[:size, :size]
        colors = rng.choice(ids[2], (grid, grid))
        labels[i, 2] = np.kron(colors, np.ones((block, block), np.int64))[:size, :size]
    scenes = rng.choice(ids[3], (n, 1))
    return torch.from_numpy(labels), torch.from_numpy(scenes)


def dense_gemm(masks: torch.Tensor, labels: torch.Tensor, concepts: int, chunk: int = 2):
    """Intersection only: mask[U, n*P] @ onehot[n*P, concepts] over every concept."""
    n, u, h, w = masks.shape
    inter = torch.zeros(u, concepts, dtype=torch.float64)
    for i0 in range(0, n, chunk):
        m = masks[i0 : i0 + chunk].reshape(-1, u, h * w).to(torch.float32)
        lab = labels[i0 : i0 + chunk].reshape(m.shape[0], -1, h * w).transpose(1, 2)
        onehot = torch.zeros(m.shape[0], h * w, concepts)
        onehot.scatter_(2, lab, 1.0)
        inter += torch.bmm(m, onehot).sum(0)
    return inter


def scatter_add(masks: torch.Tensor, labels: torch.Tensor, concepts: int):
    """Intersection only: ``index_add_`` of each pixel's mask column at its label."""
    n, u, h, w = masks.shape
    inter = torch.zeros(u, concepts)
    for i in range(n):
        m = masks[i].reshape(u, h * w).to(torch.float32)
        for layer in labels[i].reshape(-1, h * w):
            inter.index_add_(1, layer, m)
    return inter


def timed(variants: dict[str, Callable[[], object]], repeat: int) -> dict[str, tuple]:
    """Median (wall, CPU) seconds of each variant, timed in interleaved rounds.

    Interleaving spreads the drift of a shared machine's load over all variants;
    CPU time (all threads) is the steadier figure when cores are contended.
    """
    times: dict[str, list] = {name: [] for name in variants}
    for _ in range(repeat):
        for name, fn in variants.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {
        name: (statistics.median(w for w, _ in ts), statistics.median(c for _, c in ts))
        for name, ts in times.items()
    }


def threshold_for(density: float) -> float:
    """The standard normal quantile with ``density`` of the mass above it."""
    return float(np.sqrt(2.0) * torch.erfinv(torch.tensor(1.0 - 2.0 * density)))


def main() -> None:
    """Run every variant on the same data and print images/s and pixel-units/s."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=512)
    parser.add_argument("--concepts", type=int, default=200)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--no-alternatives", action="store_true", help="skip the slow ones")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, u, size = args.batch, args.units, args.size
    table = concept_table(args.concepts)
    labels, scenes = broden_like_labels(table, n, size, seed=0)
    acts = torch.randn(n, u, size, size)
    thr = {d: torch.full((u,), threshold_for(d)) for d in (0.005, 0.02, 0.05, 0.2)}
    masks = acts >= thr[0.005][None, :, None, None]
    every = torch.from_numpy(np.random.default_rng(1).integers(1, args.concepts + 1, labels.shape))
    on = np.empty(acts.shape, dtype=bool)

    check = IoU(u, table)
    check.update(masks[:2], labels[:2])
    for alternative in (dense_gemm, scatter_add):
        got = alternative(masks[:2], labels[:2], args.concepts + 1).round().long()
        if not torch.equal(got[:, 1:], check.intersection()[:, 1:]):
            raise AssertionError(f"{alternative.__name__} disagrees with IoU on the same data")

    entries = np.nonzero(masks.numpy().reshape(n, u, -1))
    finder = ThresholdedUpsample((size, size), (size, size), (size, size))

    def update_on(find: bool):
        stat = IoU(u, table, categories=CATEGORIES)
        if find:
            return lambda: stat.update_on(
                *finder.on(acts.numpy(), thr[0.005].numpy()), labels, scenes
            )
        return lambda: stat.update_on(*entries, labels, scenes)

    def update(method: str, density=None, lab=labels, img=scenes):
        stat = IoU(u, table, categories=CATEGORIES, method=method)
        if density is None:
            return lambda: stat.update(masks, lab, img)
        return lambda: stat.update(acts, lab, img, thresholds=thr[density])

    variants: dict[str, Callable[[], object]] = {
        "IoU auto, bool masks 0.5% on": update("auto"),
        "IoU sparse, bool masks 0.5% on": update("sparse"),
        "IoU gemm, bool masks 0.5% on": update("gemm"),
        "IoU auto, activations + thresholds, 0.5% on": update("auto", 0.005),
        "IoU sparse, activations + thresholds, 0.5% on": update("sparse", 0.005),
        "IoU gemm, activations + thresholds, 0.5% on": update("gemm", 0.005),
        "IoU update_on, the on entries of 0.5% masks": update_on(find=False),
        "IoU update_on, entries found from activations, 0.5%": update_on(find=True),
        "ceiling: threshold only (numpy act >= T into bool)": lambda: np.greater_equal(
            acts.numpy(), thr[0.005].numpy()[None, :, None, None], out=on
        ),
    }
    for density in (0.02, 0.05, 0.2):
        for method in ("sparse", "gemm"):
            variants[f"IoU {method}, activations, {density:.0%} on"] = update(method, density)
    for method in ("sparse", "gemm"):
        variants[f"IoU {method}, worst case: every concept in every image"] = update(
            method, lab=every, img=None
        )
    if not args.no_alternatives:
        variants["alt: dense one-hot GEMM, all concepts (I only)"] = lambda: dense_gemm(
            masks, labels, args.concepts + 1
        )
        variants["alt: index_add_ scatter (I only)"] = lambda: scatter_add(
            masks, labels, args.concepts + 1
        )
    pixel_units = n * u * size * size
    print(
        f"U={u} concepts={args.concepts} labels {size}x{size} batch {n}, "
        f"{torch.get_num_threads()} torch threads, median of {args.repeat} interleaved rounds"
    )
    print(
        f"{'variant':56s} {'wall s':>7s} {'cpu s':>7s} {'images/s':>9s} "
        f"{'G px-units/s':>13s} {'cpu vs first':>12s}"
    )
    results = timed(variants, args.repeat)
    base = None
    for name, (wall, cpu) in results.items():
        base = base or cpu
        print(
            f"{name:56s} {wall:7.3f} {cpu:7.3f} {n / wall:9.1f} "
            f"{pixel_units / wall / 1e9:13.2f} {base / cpu:11.2f}x"
        )
    print("images/s and px-units/s from wall time; 'cpu vs first' = CPU-time speed ratio")


if __name__ == "__main__":
    main()
