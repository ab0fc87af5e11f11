"""Quantile sketch benchmark: nethook's Quantile next to Apache DataSketches KLL.

Side by side in one run (interleaved batch by batch, so machine load hits all
alike), float32, ``C`` channels of mixed distributions (ReLU channels with 50-90%
exact zeros, log-normal, normal, uniform), ``N`` values per channel:

* update throughput (values/s; KLL is fed per channel, its transpose included),
* max rank error over all channels at q in {0.5, 0.99, 0.995, 0.999} against the
  exact ranks (the error of an answer v is the distance from q to the interval
  [F(v-), F(v)], so ties are judged correctly),
* bytes per channel, and the readout time of those quantiles for all channels.

KLL runs at k=200 and at the k whose serialized size matches our bytes/channel.
Exact ranks come from a second pass over the regenerated (seeded) data, so the
data never has to fit in memory. Run: ``.venv/bin/python benchmarks/bench_quantile.py``
(``--channels 64 --n 500000`` for a quick look).

``--readout``: readout times on a fresh copy of a sketch (``from_state_dict``, so
nothing is cached) of ``--updates`` batches of ``relu(randn(20000, C))``: 4 quantiles
(0.5, 0.99, 0.995, 0.999), q = 0.995 alone, 100 quantile levels and ``cdf`` of 100
values per channel (what gandissect asks), each by searching the sorted levels (the
sketch's readout) next to sorting both stacks whole (its fallback, and how it read
out before), interleaved, CPU time, min and median of ``--repeats``.

``--dissect``: ``Quantile.update`` time per layer of the demo scene CNN in the
shape network dissection feeds it (``[B*h*w, C]`` of a batch of 50 64x64 images),
next to the forward pass over the same batch.
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager

import numpy as np
import torch
from datasketches import kll_floats_sketch

import nethook.stats.quantile as quantile
from nethook.stats.base import flatten, from_state_dict
from nethook.stats.quantile import Quantile

QS = (0.5, 0.99, 0.995, 0.999)


def batches(channels: int, n: int, batch: int, seed: int):
    """Yield ``[batch, C]`` float32 batches of the mixed test distribution."""
    rng = np.random.default_rng(seed)
    kind = np.arange(channels) % 4
    shift = np.linspace(0.0, 1.3, channels, dtype=np.float32)  # ReLU: 50-90% zeros
    for start in range(0, n, batch):
        x = rng.standard_normal((min(batch, n - start), channels), dtype=np.float32)
        relu = np.maximum(x - shift, 0)
        lognormal = np.exp(x)
        uniform = (x > 0).astype(np.float32) * 0.5 + rng.random(x.shape, dtype=np.float32) * 0.5
        yield np.choose(kind, [relu, lognormal, x, uniform]).astype(np.float32)


def kll_k_for_bytes(target: int, n: int) -> int:
    """The KLL k whose serialized size after ``n`` values is closest to ``target``."""
    data = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    lo, hi = 8, 65536
    while hi - lo > 16:
        mid = (lo + hi) // 2
        sketch = kll_floats_sketch(mid)
        sketch.update(data)
        lo, hi = (mid, hi) if len(sketch.serialize()) < target else (lo, mid)
    return (lo + hi) // 2


def rank_errors(answers: np.ndarray, channels: int, n: int, batch: int, seed: int) -> np.ndarray:
    """Exact rank error of ``answers`` ``[S, C, Q]`` (one pass over regenerated data)."""
    flat = answers.transpose(0, 2, 1).reshape(-1, channels)  # [S*Q, C]
    below = np.zeros(flat.shape, np.int64)
    at_most = np.zeros(flat.shape, np.int64)
    for x in batches(channels, n, batch, seed):
        for i, v in enumerate(flat):
            below[i] += np.count_nonzero(x < v, axis=0)
            at_most[i] += np.count_nonzero(x <= v, axis=0)
    q = np.tile(np.asarray(QS), answers.shape[0])[:, None]
    err = np.maximum(0.0, np.maximum(below / n - q, q - at_most / n))
    return err.reshape(answers.shape[0], len(QS), channels).transpose(0, 2, 1)


@contextmanager
def sorting_readout():
    """Readouts as before the search: quantiles sort both stacks whole (the search
    certifies nothing, so all fall back); cdf counts each level against each value."""
    search, count = quantile._select_in_levels, quantile._Levels.weight_at_most

    def certify_nothing(levels, need, total):
        return np.zeros(need.shape, levels[0][1].dtype), np.zeros(need.shape, bool)

    def count_each(self, v):
        total = np.zeros(v.shape)
        for h, level in self.sorted_pieces():
            for j in range(v.shape[1]):
                total[:, j] += np.count_nonzero(level <= v[:, j : j + 1], axis=1) * 2.0**h
        return total

    quantile._select_in_levels, quantile._Levels.weight_at_most = certify_nothing, count_each
    try:
        yield
    finally:
        quantile._select_in_levels, quantile._Levels.weight_at_most = search, count


def readout_times(channels: int, updates: int, repeats: int) -> None:
    """Print first-readout times of the search next to the sorting path (see ``--readout``)."""
    torch.manual_seed(0)
    sketch = Quantile()
    for _ in range(updates):
        sketch.update(torch.relu(torch.randn(20000, channels)))
    state = sketch.state_dict()
    levels = np.linspace(0.005, 0.995, 100)
    candidates = torch.from_numpy(from_state_dict(state).quantiles(levels).numpy())
    tasks = {
        "4 quantiles": lambda q: q.quantiles([0.5, 0.99, 0.995, 0.999]),
        "q=0.995 alone": lambda q: q.quantiles([0.995]),
        "100 quantile levels": lambda q: q.quantiles(levels),
        "cdf of 100 values": lambda q: q.cdf(candidates),
    }
    seconds = {(task, way): [] for task in tasks for way in ("search", "sort")}
    again = []
    for _ in range(repeats):
        for task, run in tasks.items():
            for way in ("search", "sort"):
                fresh = from_state_dict(state)
                with sorting_readout() if way == "sort" else _nothing():
                    t0 = time.process_time()
                    run(fresh)
                    seconds[task, way].append(time.process_time() - t0)
                    if task == "4 quantiles" and way == "search":
                        t0 = time.process_time()
                        run(fresh)
                        again.append(time.process_time() - t0)
    print(
        f"readout, C={channels}, N={sketch.count:,} per channel, CPU ms (min / median of {repeats})"
    )
    print(f"{'':<22}{'search':>16}{'sort (cdf: count)':>20}{'speed-up':>10}")
    for task in tasks:
        fast, slow = (np.array(seconds[task, way]) * 1e3 for way in ("search", "sort"))
        row = f"{task:<22}{fast.min():>7.1f} / {np.median(fast):<6.1f}"
        row += f"{slow.min():>11.1f} / {np.median(slow):<6.1f}{np.median(slow / fast):>9.1f}x"
        print(row)
    print(f"4 quantiles again on the same copy: {min(again) * 1e3:.1f} ms")


@contextmanager
def _nothing():
    yield


def dissect_updates(batches: int) -> None:
    """Print ``Quantile.update`` time per demo-CNN layer next to the forward pass."""
    from nethook import load_model

    torch.manual_seed(0)
    model = load_model("nethook.demo.scene_cnn:scene_cnn")
    names = ["block1", "block2", "block3", "block4"]
    acts: dict[str, torch.Tensor] = {}
    for name in names:
        module = getattr(model, name)
        module.register_forward_hook(lambda m, i, o, name=name: acts.__setitem__(name, o))
    sketches = {name: Quantile() for name in names}
    forward, update = 0.0, dict.fromkeys(names, 0.0)
    with torch.no_grad():
        for _ in range(batches):
            images = torch.rand(50, 3, 64, 64)
            t0 = time.process_time()
            model(images)
            forward += time.process_time() - t0
            for name in names:
                x = flatten(acts[name])
                t0 = time.process_time()
                sketches[name].update(x)
                update[name] += time.process_time() - t0
    per = 1000 / (50 * batches)  # seconds per 1000 images
    print(f"Quantile.update on the demo CNN, batch 50, {batches} batches, CPU s per 1000 images")
    for name in names:
        shape = list(flatten(acts[name]).shape)
        rate = shape[0] * shape[1] * batches / update[name] / 1e6
        print(f"  {name:<8}{str(shape):<16}{update[name] * per:>7.2f} s  ({rate:.0f} M values/s)")
    print(f"  all layers{'':<14}{sum(update.values()) * per:>7.2f} s")
    print(f"  forward pass{'':<12}{forward * per:>7.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--n", type=int, default=2_000_000, help="values per channel")
    parser.add_argument("--batch", type=int, default=8192, help="rows per update")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--readout", action="store_true", help="readout times only")
    parser.add_argument("--updates", type=int, default=100, help="--readout: batches fed")
    parser.add_argument("--repeats", type=int, default=7, help="--readout: timed repeats")
    parser.add_argument("--dissect", type=int, default=0, metavar="BATCHES", help="demo CNN")
    args = parser.parse_args()
    if args.readout:
        readout_times(args.channels, args.updates, args.repeats)
        return
    if args.dissect:
        dissect_updates(args.dissect)
        return
    C, N, B = args.channels, args.n, args.batch

    probe = Quantile()
    for x in batches(4, N, B, args.seed):
        probe.update(torch.from_numpy(x))
    ours_bytes = probe.nbytes_per_channel()
    k_eq = kll_k_for_bytes(ours_bytes, N)
    print(f"C={C} N={N:,} per channel, batch={B}; KLL k for equal memory: {k_eq}")

    names = ["nethook Quantile", "KLL k=200", f"KLL k={k_eq}"]
    ours = Quantile()
    sizes = zip(names[1:], (200, k_eq), strict=True)
    klls = {name: [kll_floats_sketch(k) for _ in range(C)] for name, k in sizes}
    seconds = dict.fromkeys(names, 0.0)
    for x in batches(C, N, B, args.seed):
        t0 = time.process_time()
        ours.update(torch.from_numpy(x))
        seconds[names[0]] += time.process_time() - t0
        for name, sketches in klls.items():
            t0 = time.process_time()
            rows = np.ascontiguousarray(x.T)
            for c in range(C):
                sketches[c].update(rows[c])
            seconds[name] += time.process_time() - t0

    answers, readout, nbytes = [], {}, {}
    t0 = time.process_time()
    answers.append(ours.quantiles(QS).numpy())
    readout[names[0]] = time.process_time() - t0
    t0 = time.process_time()
    ours.quantiles(QS)
    cached = time.process_time() - t0
    fresh = from_state_dict(ours.state_dict())
    t0 = time.process_time()
    fresh.quantiles([0.995])
    tail_only = time.process_time() - t0
    nbytes[names[0]] = ours.nbytes_per_channel()
    for name, sketches in klls.items():
        t0 = time.process_time()
        answers.append(np.array([s.get_quantiles(list(QS)) for s in sketches]))
        readout[name] = time.process_time() - t0
        nbytes[name] = int(np.mean([len(s.serialize()) for s in sketches]))
    errors = rank_errors(np.stack(answers), C, N, B, args.seed)

    base = C * N / seconds[names[1]]
    header = f"{'sketch':<20}{'M values/s':>11}{'vs KLL200':>10}{'bytes/ch':>10}{'readout ms':>11}"
    print(header + "".join(f"{'q=' + str(q):>10}" for q in QS))
    for i, name in enumerate(names):
        rate = C * N / seconds[name]
        row = f"{name:<20}{rate / 1e6:>11.1f}{rate / base:>9.2f}x{nbytes[name]:>10}"
        row += f"{readout[name] * 1e3:>11.1f}"
        print(row + "".join(f"{e:>10.1e}" for e in errors[i].max(0)))
    bound = ours.rank_error_bound(QS).numpy().max(0)
    print("nethook stated bound (delta=1e-6):" + "".join(f"{b:>10.1e}" for b in bound))
    print(
        f"nethook readout: {readout[names[0]] * 1e3:.1f} ms first call, {cached * 1e3:.1f} ms "
        f"again, {tail_only * 1e3:.1f} ms for q=0.995 alone on a fresh copy (tail only)"
    )


if __name__ == "__main__":
    main()
