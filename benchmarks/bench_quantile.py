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
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from datasketches import kll_floats_sketch

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--n", type=int, default=2_000_000, help="values per channel")
    parser.add_argument("--batch", type=int, default=8192, help="rows per update")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
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
    fresh = Quantile()
    fresh.load_state_dict(ours.state_dict())
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
        f"again (sorted views cached), {tail_only * 1e3:.1f} ms for q=0.995 alone (tail only)"
    )


if __name__ == "__main__":
    main()
