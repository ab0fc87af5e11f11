"""Per-channel streaming quantiles with accurate tails: a hand-written, vectorized sketch.

:class:`Quantile` keeps, for every channel at once, two lockstep KLL-style compactor
stacks (``[C, n_h]`` arrays, one per level ``h``, items of weight ``2**h``, every
row kept sorted):

* the **body** sees every value and answers ranks below the tail threshold;
* the **tail** sees only the values at or above a per-channel threshold ``t_c``
  (padded with ``-inf`` so all channels keep the same length), set near the
  ``1 - tail`` quantile (default ``tail=0.02``) once the body first compacts, and
  only ever raised. Every value ``> t_c`` has therefore entered the tail, so for
  any ``v >= t_c`` the count of values above ``v`` comes from the tail alone,
  whose error scales with the tail's ~2% share of the stream rather than with
  ``N``. This is what makes q in [0.99, 0.999] ~10x more accurate than a
  uniform-error KLL of the same memory (``docs/stats.md`` has the figures).
  The threshold only rises: on a stream whose values fall over time the tail
  may cover less than the top ``tail`` share, and ranks below it get the body's
  (reported) bound.

Why hand-written: DataSketches KLL/REQ are scalar per-channel objects (a Python
loop over 512 channels, ~30 M values/s) and KLL's error is uniform over ranks;
t-digest interpolates through ties and misses the median of ReLU channels (mostly
exact zeros). Here one numpy/torch call compacts all channels; the CPU path uses
numpy (sort/partition of ``[C, B]`` rows run 3.5-14x faster than torch's on CPU),
CUDA tensors stay in torch. On CPU each 512-row chunk of a batch is transposed
into a cache-sized buffer, sorted, and its first three compactions are fused into
one strided pick, so a batch is never transposed or sorted as a whole.

Readout without sorting. Levels are stored sorted per row (a compaction sorts its
level anyway; other new items are sorted when their level compacts or at the next
readout), so a readout searches them instead of merging ~12 k items per channel:
``cdf`` is one vectorized bisection per level; ``quantiles`` bisects at a pivot
from the heaviest level, then sorts a small window of items per query around it
and certifies the answer from exact counts (:func:`_select_in_levels`). Answers
equal those of sorting every row whole, exactly (tested); that sort remains the
fallback for channels holding NaN and for the rare answers the search cannot
certify, and is the readout of torch (CUDA) state, where sorting is cheap. Four
quantiles of 512 channels read out ~12x faster than by sorting (~9 ms instead of
~110 ms of CPU on a busy 2-core machine; ``bench_quantile.py --readout``).

Error bound (stated and tested). A compaction sorts a level and keeps every other
item from a random offset (one per channel); for any query value it changes the
estimated count by 0 or ``+-2**h`` with equal odds. The errors of all compactions
form a martingale, so by Azuma-Hoeffding, for one query and one channel,

    P(|rank error| > sqrt(2 V ln(2/delta)) / n) <= delta,   V = sum_h m_h 4**h,

with ``m_h`` the number of compactions at level ``h`` (the same for all channels)
and ``n`` the channel's non-NaN count. ``V`` is the body's for ranks answered by
the body and the tail's for ranks in the tail region. :meth:`rank_error_bound`
returns these bounds for the state at hand. With the defaults (``k=4096``,
``tail_k=1024``, ``tail=0.02``) and i.i.d. data the bound at ``delta=1e-6``
is about 1.1e-3 for the body and 9e-5 for the tail at N = 2e6 (both grow
slowly with log N); observed errors are 2-3x smaller (max over 512 channels 4e-4 in
the body, 4e-5 at q in [0.99, 0.999]).
Results are exact while ``N <= k`` (nothing compacted yet), and ``min()``,
``max()``, ``count`` and ``nan_count`` are always exact.

Memory: at most ``~3k + 3 tail_k`` items per channel plus ``k_min`` per extra
level (:meth:`Quantile.max_nbytes_per_channel`): under 64 KiB per channel
(float32) for ``N <= 2**36``.

NaN values are counted (``nan_count``) and excluded from ranks (internally they
sort above ``+inf``); ``+-inf`` are ordinary values. Quantiles follow the
"inverted CDF" definition (numpy ``method="inverted_cdf"``): the smallest stored
value whose estimated rank reaches ``q * n``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr

from nethook.stats.base import Stat, as_numpy, check_batch, xr_units

Array = np.ndarray | torch.Tensor

_F32_MAX = float(np.finfo(np.float32).max)
_LEVEL_BITS = 6  # level ids packed into the low mantissa bits of float64 sort keys
_LEVEL_MASK = (1 << _LEVEL_BITS) - 1
_HUGE = 2.0**900  # stands in for +-inf in packed keys (a power of two: free low bits)
_FUSED = 3  # compactions fused into one pick on the CPU path (see extend_compacted)
_CHUNK = 512  # rows per fused level-0 compaction chunk (a [C, 512] buffer stays in cache)
_SCAN = 16  # pieces this short are counted by comparing every item, not by bisection
_FOLD = 256  # values per folded row in column reductions (see _reduce_columns)
_TRANSPOSE_BLOCK = 256  # rows per block of the cache-friendly [N, C] -> [C, N] copy


# ---------------------------------------------------------------------------
# Array kernels: numpy on CPU (several times faster here), torch on accelerators.
# ---------------------------------------------------------------------------


NUMPY_ON_CPU = True  # tests set this False to run the torch (accelerator) kernels on CPU


def _numpy_on(device: torch.device) -> bool:
    """Whether state on ``device`` is kept as numpy arrays (CPU: numpy is faster here)."""
    return device.type == "cpu" and NUMPY_ON_CPU


def _is_np(a: Array) -> bool:
    return isinstance(a, np.ndarray)


def _cat(arrays: Sequence[Array]) -> Array:
    """Concatenate ``[C, n_i]`` arrays along the item axis."""
    if len(arrays) == 1:
        return arrays[0]
    if _is_np(arrays[0]):
        return np.concatenate(arrays, axis=1)
    return torch.cat(list(arrays), dim=1)


def _empty_like_rows(a: Array, n: int = 0) -> Array:
    if _is_np(a):
        return np.empty((a.shape[0], n), a.dtype)
    return a.new_empty((a.shape[0], n))


def _sort_rows(a: Array) -> Array:
    if _is_np(a):
        return np.sort(a, axis=1)
    return torch.sort(a, dim=1).values


def _count_at_most(a: Array, v: Array, rows: np.ndarray | None = None) -> Array:
    """Per row of row-sorted ``a`` ``[C, n]``: how many items are ``<= v[c, j]`` (``[C, K]``).

    With ``rows`` (numpy only), ``v`` is flat and query ``i`` searches row ``rows[i]``.
    NaN items (sorted last) never count. numpy has no batched searchsorted, so the
    numpy path runs one branchless bisection for all rows and queries at once:
    ``ceil(log2 n)`` vectorized steps of a gather and a compare.
    """
    n = a.shape[1]
    if not _is_np(a):
        return _torch_count_at_most(a, v)
    if n == 0:
        return np.zeros(v.shape, np.int64)
    if n <= _SCAN:
        ahead = a[:, None, :] if rows is None else a[rows]
        return np.count_nonzero(ahead <= v[..., None], axis=-1)
    flat = a.reshape(-1)
    if rows is None:
        start = np.broadcast_to((np.arange(a.shape[0], dtype=np.int64) * n)[:, None], v.shape)
    else:
        start = rows * n
    base = start.copy()
    size = n
    while size > 1:
        half = size // 2
        base += half * (flat[base + half] <= v)
        size -= half
    return base - start + (flat[base] <= v)


def _torch_count_at_most(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``torch.searchsorted`` per row (items ``<= v``), with NaN items never counted.

    torch's bisection counts NaN items as below every value, so they are searched
    as ``+inf`` and taken off again where a query is ``+inf``.
    """
    nan = torch.isnan(a)
    if not bool(nan.any()):
        return torch.searchsorted(a.contiguous(), v.contiguous(), right=True)
    counts = torch.searchsorted(a.masked_fill(nan, np.inf), v.contiguous(), right=True)
    return counts - torch.where(v == np.inf, nan.sum(1, keepdim=True), 0)


_PIECES = 4  # sorted pieces a level may keep apart between compactions
_WINDOW_MARGIN = 2.0  # windows cover this many times the weight between pivot and target
_WINDOW_SLACK = 2  # plus this many items per level
_WINDOW_MAX = 1024  # items per query; larger windows go to the sorting fallback
_WINDOW_ROUNDS = 6  # pivots tried (windows 4x wider each time) before falling back to sorting
_WINDOW_FAR = 8  # expected items between pivot and target above which the pivot moves first


def _select_in_levels(
    levels: list[tuple[int, np.ndarray]], need: np.ndarray, total: int
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted selection across row-sorted pieces without merging them.

    ``levels`` holds ``(h, piece)`` pairs: row-sorted ``[C, n]`` items of weight
    ``2**h``. For target weights ``need`` ``[C, Q]`` (ints in ``[1, total]``) returns
    the smallest item ``v`` per query with ``W(v) >= need``, where ``W(v)`` is the
    weight of the items ``<= v``, and a mask of the answers it could certify.

    1. A pivot per query: the item of the heaviest piece at the target's share.
    2. Exact ``W`` just below and at the pivot, by bisection in every piece (all
       queries at once). If the target falls on the pivot (ties included), done.
    3. If more than ``_WINDOW_FAR`` items are expected between pivot and target,
       the pivot moves along the heaviest piece by the gap's share; back to 2.
    4. Otherwise a window of items on the target's side of the pivot, per piece
       ``~ 2 |need - W| n / total + 2`` items (what the gap holds when the pieces
       mix alike), is gathered and sorted per query (tens of items), and
       cumulative weights from the exact count below the windows pick the answer.
       Uncertified answers go back to 2 with the pivot the windows suggest and
       4x wider windows, up to ``_WINDOW_ROUNDS`` pivots in all.

    An answer is certified when the windows hold every item between a value
    ``a`` (the largest item left below some window) with ``W(a) < need`` and a
    value ``b`` (the smallest item left above some window) with the answer
    ``<= b``: then every count used is exact. Rows with NaN items must not come
    here (NaN breaks the pivot's ordering); the caller sorts those instead.
    """
    sizes = [a.shape[1] for _, a in levels]
    g = int(np.argmax([a.shape[1] << h for h, a in levels]))
    target = need.ravel()
    row = np.repeat(np.arange(need.shape[0]), need.shape[1])
    at = np.clip(-(-target * sizes[g] // total) - 1, 0, sizes[g] - 1)
    pivot = levels[g][1].reshape(-1)[row * sizes[g] + at]
    out = np.zeros(target.size, pivot.dtype)
    ok = np.zeros(target.size, bool)
    sel = np.arange(target.size)
    margin = _WINDOW_MARGIN
    for _ in range(_WINDOW_ROUNDS):
        # Items <= pivot and <= the float below it (< pivot), in one search.
        probes = np.concatenate([pivot, np.nextafter(pivot, -np.inf).astype(pivot.dtype)])
        both = [_count_at_most(a, probes, np.tile(row[sel], 2)) for _, a in levels]
        at_most = [c[: sel.size] for c in both]
        below = [np.where(pivot == -np.inf, 0, c[sel.size :]) for c in both]
        w_at_most = sum(c << h for (h, _), c in zip(levels, at_most, strict=True))
        w_below = sum(c << h for (h, _), c in zip(levels, below, strict=True))
        hit = (w_below < target[sel]) & (target[sel] <= w_at_most)
        out[sel[hit]] = pivot[hit]
        ok[sel[hit]] = True
        off = np.flatnonzero(~hit)
        if not off.size:
            break
        # Far from the target: move the pivot along level g by the gap's share first.
        up = w_at_most[off] < target[sel[off]]
        gap = np.where(up, target[sel[off]] - w_at_most[off], w_below[off] - target[sel[off]])
        far = gap * (sum(sizes) / total) > _WINDOW_FAR
        step = np.ceil(gap * sizes[g] / total).astype(np.int64)
        moved = np.clip(np.where(up, at_most[g][off] + step, below[g][off] - step), 0, sizes[g] - 1)
        moved = levels[g][1].reshape(-1)[row[sel[off]] * sizes[g] + moved]
        near = off[~far]
        answer, good, retry = _window_answers(
            levels,
            total,
            row[sel[near]],
            target[sel[near]],
            w_at_most[near],
            w_below[near],
            [c[near] for c in at_most],
            [c[near] for c in below],
            margin,
        )
        out[sel[near[good]]] = answer[good]
        ok[sel[near[good]]] = True
        sel, pivot = (
            np.concatenate([sel[near[~good]], sel[off[far]]]),
            np.concatenate([retry[~good], moved[far]]),
        )
        margin *= 4
    return out.reshape(need.shape), ok.reshape(need.shape)


def _window_answers(
    levels: list[tuple[int, np.ndarray]],
    total: int,
    row: np.ndarray,
    target: np.ndarray,
    w_at_most: np.ndarray,
    w_below: np.ndarray,
    at_most: list[np.ndarray],
    below: list[np.ndarray],
    margin: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step 3 of :func:`_select_in_levels` for queries (flat, on ``row``) off their pivot.

    Returns the answers, which of them are certified, and for the others a
    stored item to try as the next pivot. Queries are merged in groups of
    similar window size, so one wide window does not widen all the others.
    """
    up = w_at_most < target
    gap = np.where(up, target - w_at_most, w_below - target + 1)
    lo, hi = [], []
    for (_, a), c_le, c_lt in zip(levels, at_most, below, strict=True):
        n = a.shape[1]
        reach = np.minimum(np.ceil(margin * gap * n / total) + _WINDOW_SLACK, n).astype(np.int64)
        lo.append(np.where(up, c_le, np.maximum(c_lt - reach, 0)))
        hi.append(np.where(up, np.minimum(c_le + reach, n), c_lt))
    size = sum(b - a for a, b in zip(lo, hi, strict=True))
    answer = np.zeros(target.size, levels[0][1].dtype)
    good = np.zeros(target.size, bool)
    retry = answer.copy()
    smaller = 0
    for limit in (_WINDOW_MAX // 16, _WINDOW_MAX // 4, _WINDOW_MAX):
        group = np.flatnonzero((size > smaller) & (size <= limit))
        smaller = limit
        if group.size:
            found = _merge_windows(
                levels, row[group], target[group], [a[group] for a in lo], [b[group] for b in hi]
            )
            answer[group], good[group], retry[group] = found
    return answer, good, retry


def _merge_windows(
    levels: list[tuple[int, np.ndarray]],
    row: np.ndarray,
    target: np.ndarray,
    lo: list[np.ndarray],
    hi: list[np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort the items of windows ``[lo_h, hi_h)`` per query and pick the target's.

    Returns the answers, whether each is certified (see :func:`_select_in_levels`),
    and a pivot to retry with: the lower cut if the windows stopped too high, else
    the answer found or the upper cut (ties at the answer become pivots, which the
    exact counts of step 2 settle).
    """
    values, mass = [], []
    cut_lo = np.full(row.size, -np.inf)
    cut_hi = np.full(row.size, np.inf)
    base = np.zeros(row.size, np.int64)
    for (h, a), start, stop in zip(levels, lo, hi, strict=True):
        n, flat, first = a.shape[1], a.reshape(-1), row * a.shape[1]
        index = start[:, None] + np.arange(int((stop - start).max()))
        inside = index < stop[:, None]
        values.append(flat[first[:, None] + np.minimum(index, n - 1)])  # beyond: mass 0
        mass.append(inside << h)
        edge = flat[first + np.maximum(start - 1, 0)]
        cut_lo = np.where(start > 0, np.maximum(cut_lo, edge), cut_lo)
        edge = flat[first + np.minimum(stop, n - 1)]
        cut_hi = np.where(stop < n, np.minimum(cut_hi, edge), cut_hi)
        base += start << h
    values, mass = np.concatenate(values, 1), np.concatenate(mass, 1)
    order = np.argsort(values, axis=1)
    ranked = np.take_along_axis(values, order, 1)
    cum = base[:, None] + np.cumsum(np.take_along_axis(mass, order, 1), axis=1)
    reached = cum >= target[:, None]
    found = ranked[np.arange(row.size), np.argmax(reached, axis=1)]
    w_cut = base + (mass * (values <= cut_lo[:, None])).sum(1)
    good = reached[:, -1] & (found <= cut_hi) & (w_cut < target) & (cut_lo < cut_hi)
    stored = np.where(reached[:, -1], found, np.where(cut_hi < np.inf, cut_hi, found))
    retry = np.where((w_cut >= target) & (cut_lo > -np.inf), cut_lo, stored)
    return found, good, retry


def _select_above(rows: Array, t: Array, nan: bool = True) -> Array:
    """``[C, m]``: the items ``> t[row]`` (and NaN) of every row, padded with -inf.

    The padding sorts below every query a tail answers, so it never counts as
    "above" anything; ``nan=False`` promises ``rows`` has no NaN (saves a pass).
    """
    mask = rows > t[:, None]
    if _is_np(rows):
        if nan:
            mask |= np.isnan(rows)
        counts = np.count_nonzero(mask, axis=1)
        m = int(counts.max())
        out = np.full((rows.shape[0], m), -np.inf, rows.dtype)
        if m:
            row = np.repeat(np.arange(rows.shape[0]), counts)
            start = np.cumsum(counts) - counts
            out[row, np.arange(row.size) - start[row]] = rows[mask]
        return out
    mask |= torch.isnan(rows)
    m = int(mask.sum(1).max())
    padded = torch.where(mask, rows, torch.full_like(rows, -np.inf))
    return torch.sort(padded, dim=1).values[:, rows.shape[1] - m :]


def _reduce_columns(ufunc: np.ufunc, a: np.ndarray, dtype: type | None = None) -> np.ndarray:
    """``ufunc.reduce(a, axis=0)`` for ``[N, C]``, fast also when ``C`` is small.

    numpy reduces a narrow ``[N, C]`` array over its rows 5-10x slower than a wide
    one, so runs of ``m`` rows are first folded into rows of ``m * C`` values.
    """
    n, c = a.shape
    m = max(1, _FOLD // c)
    full = n - n % m
    if m == 1 or full == 0:
        return ufunc.reduce(a, axis=0, dtype=dtype)
    out = ufunc.reduce(a[:full].reshape(full // m, m * c), axis=0, dtype=dtype)
    out = ufunc.reduce(out.reshape(m, c), axis=0)
    if full < n:
        out = ufunc(out, ufunc.reduce(a[full:], axis=0, dtype=dtype))
    return out


def _numpy_batch(x: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """A CPU ``[N, C]`` tensor as a numpy array of the storage dtype (no copy if it is)."""
    x = x.detach()
    if x.dtype != dtype:
        x = x.to(dtype)
    return x.numpy()


def _transpose(a: np.ndarray) -> np.ndarray:
    """``[N, C]`` -> contiguous ``[C, N]``, copied in cache-sized row blocks."""
    if a.T.flags.c_contiguous:
        return a.T.copy()
    out = np.empty((a.shape[1], a.shape[0]), a.dtype)
    for i in range(0, a.shape[0], _TRANSPOSE_BLOCK):
        out[:, i : i + _TRANSPOSE_BLOCK] = a[i : i + _TRANSPOSE_BLOCK].T
    return out


def _select_columns(a: np.ndarray, t: np.ndarray, nan: bool) -> np.ndarray:
    """``[C, m]``: the items ``> t[c]`` (and NaN) of every column of ``[B, C]``, -inf padded."""
    mask = a > t
    if nan:
        mask |= np.isnan(a)
    counts = _reduce_columns(np.add, mask, np.int64)
    m = int(counts.max())
    out = np.full((a.shape[1], m), -np.inf, a.dtype)
    if m:
        flat = np.flatnonzero(mask)
        cols = flat % a.shape[1]
        if a.shape[1] <= np.iinfo(np.uint16).max:
            cols = cols.astype(np.uint16)  # a stable sort of 16-bit ints is a radix sort
        order = np.argsort(cols, kind="stable")
        cols = cols[order].astype(np.intp)
        start = np.cumsum(counts) - counts
        out[cols, np.arange(cols.size) - start[cols]] = a.ravel()[flat[order]]
    return out


def _to_device(a: Array, device: torch.device) -> Array:
    """Numpy on CPU, torch elsewhere."""
    if _numpy_on(device):
        return a if _is_np(a) else a.detach().cpu().numpy()
    t = torch.from_numpy(a) if _is_np(a) else a
    return t.to(device)


_numpy = as_numpy


def _compaction_rng(seed: int, stream: int, level: int, counter: int, probe: Array):
    """The reproducible random generator of one compaction call.

    Seeded by the sketch seed, which stack and level compacts, the level's
    compaction counter and a fingerprint of the data being compacted (so shards
    merged from sketches with equal seeds do not reuse each other's offsets).
    """
    fingerprint = int(np.ascontiguousarray(_numpy(probe)).view(np.uint8).sum())
    return np.random.default_rng([seed, stream, level, counter, fingerprint])


# ---------------------------------------------------------------------------
# One stack of compactor levels, in lockstep over all channels.
# ---------------------------------------------------------------------------


class _SortedView:
    """Items of a stack sorted per row, with cumulative weights.

    ``cum[c, j]`` is the weight of row ``c``'s items up to position ``j``; on the
    numpy path ``c * span`` is added (see :meth:`_Levels.sorted_view`) and, for
    float32 data, ``values`` holds packed float64 keys that :meth:`take` decodes.
    """

    def __init__(self, values: Array, cum: Array, span: int = 0, packed: bool = False):
        self.values = values
        self.cum = cum
        self.span = span
        self.packed = packed

    def first_at_least(self, r: np.ndarray) -> np.ndarray:
        """Per row: first index whose cumulative weight reaches ``r[c, q]`` (clipped)."""
        rows, n = self.cum.shape
        need = np.ceil(np.clip(r, 0, None)).astype(np.int64)
        if not _is_np(self.cum):
            query = torch.from_numpy(need).to(self.cum.device)
            j = torch.searchsorted(self.cum.contiguous(), query.contiguous(), side="left")
            return np.minimum(_numpy(j), n - 1)
        offset = np.arange(rows, dtype=np.int64)[:, None] * self.span
        j = np.searchsorted(self.cum.ravel(), (need + offset).ravel(), side="left")
        j = j.reshape(need.shape) - np.arange(rows)[:, None] * n
        return np.clip(j, 0, n - 1)

    def take(self, index: np.ndarray) -> np.ndarray:
        """The values at ``index`` (``[C, Q]``) as a float numpy array."""
        if not _is_np(self.values):
            picked = torch.gather(self.values, 1, torch.from_numpy(index).to(self.values.device))
            return _numpy(picked)
        picked = np.take_along_axis(self.values, index, 1)
        if not self.packed:
            return picked
        picked = picked.copy()
        picked.view(np.int64)[...] &= ~_LEVEL_MASK
        picked[picked > _F32_MAX] = np.inf
        picked[picked < -_F32_MAX] = -np.inf
        return picked.astype(np.float32)


class _Levels:
    """KLL-style compactor levels shared by all channels, each kept sorted per row.

    Level ``h`` holds items of weight ``2**h`` as up to ``_PIECES`` ``[C, n]`` arrays
    ("pieces"), each sorted along every row (all rows have the same length), so
    readouts search them directly. New unsorted items wait in ``fresh`` until their
    level compacts or a readout needs them. When the stack holds more than its
    budget, the lowest level at or over its capacity ``cap_h`` is sorted whole and
    compacted: every other item (random offset per row) moves up. Capacities follow
    KLL: ``cap_h = max(k_min, k * c**(H-1-h))``, ``c = 2/3``. Everything depends
    only on each level's items, never on their order or on how they are split into
    pieces, which keeps results deterministic however updates and readouts interleave.
    """

    def __init__(self, k: int, k_min: int, seed: int, stream: int):
        self.k = k
        self.k_min = k_min
        self.seed = seed
        self.stream = stream
        self.pieces: list[list[Array]] = []
        self.fresh: dict[int, list[Array]] = {}  # unsorted pieces, sorted by compress()
        self.compactions: list[int] = []

    # sizes -----------------------------------------------------------------
    def capacity(self, h: int, levels: int | None = None) -> int:
        """Capacity of level ``h`` in a stack of ``levels`` levels (default: current)."""
        levels = len(self.pieces) if levels is None else levels
        cap = int(self.k * (2.0 / 3.0) ** (levels - 1 - h))
        return max(self.k_min, cap - cap % 2)

    def budget(self, levels: int | None = None) -> int:
        """Items the stack may hold after :meth:`compress`."""
        levels = max(1, len(self.pieces) if levels is None else levels)
        return sum(self.capacity(h, levels) for h in range(levels))

    def max_levels(self, weight: int) -> int:
        """Most levels a stack fed ``weight`` values can have.

        A new top level appears only when the old top (capacity ``k``, weight
        ``2**(H-2)``) compacts, so ``k * 2**(H-2) <= weight``; the fused CPU path
        writes straight to level ``_FUSED``.
        """
        return max(_FUSED + 1, int(np.floor(np.log2(max(weight, 1) / self.k))) + 2)

    def level_size(self, h: int) -> int:
        return sum(p.shape[1] for p in self.pieces[h] + self.fresh.get(h, []))

    def size(self) -> int:
        return sum(self.level_size(h) for h in range(len(self.pieces)))

    def weight(self) -> int:
        """Total weight of the stored items (the same for every channel)."""
        return sum(self.level_size(h) << h for h in range(len(self.pieces)))

    def variance(self) -> float:
        """``sum_h m_h 4**h``: the variance proxy of the rank error (see module doc)."""
        return float(sum(m * 4.0**h for h, m in enumerate(self.compactions)))

    def level(self, h: int) -> Array:
        """Level ``h`` as one row-sorted ``[C, n_h]`` array (its pieces merged once)."""
        fresh = self.fresh.pop(h, [])
        if fresh or len(self.pieces[h]) > 1:
            self.pieces[h] = [_sort_rows(_cat(self.pieces[h] + fresh))]
        return self.pieces[h][0]

    def sorted_pieces(self) -> list[tuple[int, Array]]:
        """``(h, piece)`` for every non-empty piece: row-sorted items of weight ``2**h``."""
        self._sort_fresh()
        return [(h, p) for h, ps in enumerate(self.pieces) for p in ps if p.shape[1]]

    # growth ----------------------------------------------------------------
    def extend(self, items: Array, level: int = 0, presorted: bool = False) -> None:
        """Add ``[C, m]`` items (owned by the stack from now on) at ``level``.

        Unless ``presorted`` (rows already ascending), the items are sorted later,
        together with the level if it compacts (one sort instead of two).
        """
        while len(self.pieces) <= level:
            self.pieces.append([_empty_like_rows(items)])
            self.compactions.append(0)
        if items.shape[1]:
            if presorted:
                self.pieces[level].append(items)
            else:
                self.fresh.setdefault(level, []).append(items)

    def extend_compacted(self, a: np.ndarray) -> None:
        """Add a ``[B, C]`` numpy batch, compacting its full chunks on the fly.

        Each chunk of ``_CHUNK`` rows is transposed into a cache-resident buffer and
        sorted there (several chunks per pass when there are few channels); ``_FUSED`` compactions in a row (levels ``0 .. _FUSED-1``,
        chunks of ``_CHUNK``, ``_CHUNK/2``, ...) then reduce to a single strided
        pick: item ``o + 2**_FUSED * i`` with a random offset ``o`` whose bits are
        the random parities of the successive compactions. Only one item in
        ``2**_FUSED`` ever reaches the upper levels. Smaller chunks at the bottom
        levels add little to the error, which the top levels dominate.
        """
        cap, step = _CHUNK, 1 << _FUSED
        rows, channels = a.shape
        chunks = rows // cap
        if chunks:
            rng = _compaction_rng(self.seed, self.stream, 0, self.compactions[0], a[0, :16])
            offsets = rng.integers(0, step, size=(chunks, channels), dtype=np.int64)
            width = cap // step
            picks = np.arange(0, cap, step)[None, None, :]
            out = np.empty((channels, chunks * width), a.dtype)
            group = min(chunks, max(1, _CHUNK // channels))  # chunks per cache-sized pass
            buf = np.empty((channels, group, cap), a.dtype)
            for i in range(0, chunks, group):
                g = min(group, chunks - i)
                block = a[i * cap : (i + g) * cap].reshape(g, cap, channels)
                np.copyto(buf[:, :g], block.transpose(2, 0, 1))
                buf[:, :g].sort(axis=2)
                index = offsets[i : i + g].T[:, :, None] + picks
                picked = np.take_along_axis(buf[:, :g], index, 2)
                out[:, i * width : (i + g) * width] = picked.reshape(channels, g * width)
            while len(self.pieces) <= _FUSED:
                self.extend(out[:, :0], len(self.pieces))
            for h in range(_FUSED):
                self.compactions[h] += chunks
            self.extend(out, _FUSED)
        if rows > chunks * cap:
            self.extend(_transpose(a[chunks * cap :]), 0)

    def absorb(self, other: _Levels) -> None:
        """Add every level of ``other`` (a copy) to this stack (merge; no compaction)."""
        for h, pieces in enumerate(other.pieces):
            for piece in pieces:
                self.extend(piece, h, presorted=True)
            self.compactions[h] += other.compactions[h]

    def compress(self) -> None:
        """Compact until the stack fits its budget; merge pieces down to ``_PIECES`` a level.

        Levels that do not compact keep their sorted pieces apart (readouts search
        pieces), so a large top level is not re-merged for every small addition;
        unsorted pieces wait for their level's compaction or the next readout.
        Neither changes any result: those depend only on each level's items.
        """
        while self.size() > self.budget():
            for h in range(len(self.pieces)):
                if self.level_size(h) >= self.capacity(h):
                    self._compact(h)
                    break
        self._limit_pieces()

    def _sort_fresh(self) -> None:
        """Sort the unsorted pieces (each level's at once), for a readout."""
        for h, fresh in self.fresh.items():
            self.pieces[h].append(_sort_rows(_cat(fresh)))
        self.fresh = {}
        self._limit_pieces()

    def _limit_pieces(self) -> None:
        """Merge each level's sorted pieces down to ``_PIECES``."""
        for pieces in self.pieces:
            while len(pieces) > _PIECES:
                pieces.sort(key=lambda p: p.shape[1])
                pieces[:2] = [_sort_rows(_cat(pieces[:2]))]

    def _compact(self, h: int) -> None:
        """Compact level ``h`` whole (KLL): keep every other item of the sorted level.

        One random offset per row; an odd item out (the largest) stays. Compacting
        the whole level, rather than chunks of it, keeps every level a sample of
        the whole value range (chunks from the bottom would leave the largest
        items behind at low levels).
        """
        items = self.level(h)
        used = items.shape[1] - items.shape[1] % 2
        rest = items[:, used:]
        self.pieces[h] = [rest.copy() if _is_np(rest) else rest.clone()]
        rows = items.shape[0]
        rng = _compaction_rng(self.seed, self.stream, h, self.compactions[h], items[0, :16])
        bits = rng.integers(0, 2, size=(rows, 1), dtype=np.int64).astype(bool)
        pairs = items[:, :used].reshape(rows, used // 2, 2)
        if _is_np(items):
            kept = np.where(bits, pairs[..., 1], pairs[..., 0])
        else:
            kept = torch.where(
                torch.from_numpy(bits).to(items.device), pairs[..., 1], pairs[..., 0]
            )
        self.compactions[h] += 1
        self.extend(kept, h + 1, presorted=True)

    def prune(self, t: Array) -> None:
        """Drop items ``<= t[row]`` where every row can (lengths stay equal)."""
        for h in range(len(self.pieces)):
            a = self.level(h)
            keep = a.shape[1] - int(_numpy(_count_at_most(a, t[:, None])).min(initial=0))
            if keep < a.shape[1]:
                rest = a[:, a.shape[1] - keep :]
                self.pieces[h] = [rest.copy() if _is_np(rest) else rest.clone()]

    # readout ---------------------------------------------------------------
    def weight_at_most(self, v: Array) -> np.ndarray:
        """Per row and query: total weight of items ``<= v`` (``v`` is ``[C, Q]``)."""
        total = np.zeros(tuple(v.shape))
        for h, a in self.sorted_pieces():
            total += _numpy(_count_at_most(a, v)) * 2.0**h
        return total

    def select(self, r: np.ndarray, exact_rows: np.ndarray) -> np.ndarray:
        """``[C, Q]``: per row, the smallest item whose estimated count reaches ``r``.

        The estimated count of a value is the weight of the items ``<= it`` (NaN
        items count as the largest); targets are rounded up and clipped to
        ``[1, weight]``. On numpy, the sorted levels are searched without merging
        them (see :func:`_select_in_levels`); rows flagged in ``exact_rows``
        (those holding NaN), answers that search cannot certify, and torch
        tensors go through one sort of the whole rows (:meth:`sorted_view`).
        """
        total = self.weight()
        need = np.clip(np.ceil(np.clip(r, 0, None)), 1, max(total, 1)).astype(np.int64)
        levels = self.sorted_pieces()
        if not levels:
            return np.full(need.shape, np.nan)
        if not _is_np(levels[0][1]):
            view = self.sorted_view()
            return view.take(view.first_at_least(need))
        out, ok = _select_in_levels(levels, need, total)
        rows = np.flatnonzero(exact_rows | ~ok.all(1))
        if rows.size:
            view = self.sorted_view(rows)
            out[rows] = view.take(view.first_at_least(need[rows]))
        return out

    def items(self, rows: np.ndarray | None = None) -> tuple[Array, np.ndarray]:
        """All items ``[C, n]`` (or of ``rows`` only) and their level ids ``[n]``."""
        levels = [self.level(h) for h in range(len(self.pieces))]
        if rows is not None:
            levels = [a[rows] for a in levels]
        ids = np.concatenate([np.full(a.shape[1], h, np.int64) for h, a in enumerate(levels)])
        return _cat(levels), ids

    def sorted_view(self, rows: np.ndarray | None = None) -> _SortedView:
        """Per row (of ``rows``): all items in ascending order and their cumulative weight."""
        values, ids = self.items(rows)
        weights = 2 ** np.arange(max(1, len(self.pieces)), dtype=np.int64)
        if not _is_np(values):
            order = torch.argsort(values, dim=1)
            w = torch.from_numpy(weights[ids]).to(values.device)
            return _SortedView(torch.gather(values, 1, order), torch.cumsum(w[order], dim=1))
        count, n = values.shape
        span = self.weight() + 1
        if values.dtype == np.float32:
            # Pack the level id into low float64 mantissa bits that float32 values
            # never use: one float sort instead of an argsort (2x faster). +-inf
            # become +-2**900 so that their packed keys stay numbers.
            keys = values.astype(np.float64)
            if np.isinf(values).any():
                np.clip(keys, -_HUGE, _HUGE, out=keys)
            bits = keys.view(np.uint64)
            bits |= ids.astype(np.uint64)
            keys.sort(axis=1)
            w = bits.view(np.int64) & _LEVEL_MASK
            np.left_shift(1, w, out=w)
            packed = True
        else:
            order = np.argsort(values, axis=1)
            keys = np.take_along_axis(values, order, 1)
            w = weights[ids][order]
            packed = False
        # Offset row c by c * span, so all rows form one increasing array that a
        # single searchsorted call can search (numpy has no batched searchsorted).
        w[:, 0] += np.arange(count, dtype=np.int64) * span
        return _SortedView(keys, np.cumsum(w, axis=1, out=w), span, packed)

    # persistence -----------------------------------------------------------
    def state(self) -> dict[str, Any]:
        levels = [_numpy(self.level(h)) for h in range(len(self.pieces))]
        return {
            "items": np.concatenate(levels, axis=1) if levels else np.zeros((0, 0), np.float32),
            "sizes": np.array([a.shape[1] for a in levels], np.int64),
            "compactions": np.array(self.compactions, np.int64),
        }

    def load(self, sd: dict[str, Any], device: torch.device, presorted: bool) -> None:
        """Restore :meth:`state`; ``presorted=False`` for states whose levels may be unsorted."""
        items = np.asarray(sd["items"])
        sizes = np.asarray(sd["sizes"], np.int64)
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        self.pieces = []
        for h in range(len(sizes)):
            level = np.array(items[:, bounds[h] : bounds[h + 1]])
            if not presorted:
                level.sort(axis=1)
            self.pieces.append([_to_device(level, device)])
        self.compactions = [int(m) for m in np.asarray(sd["compactions"])]

    def to(self, device: torch.device) -> None:
        self._sort_fresh()
        self.pieces = [[_to_device(p, device) for p in pieces] for pieces in self.pieces]

    def copy(self) -> _Levels:
        self._sort_fresh()
        new = _Levels(self.k, self.k_min, self.seed, self.stream)
        new.pieces = [[p.copy() if _is_np(p) else p.clone() for p in ps] for ps in self.pieces]
        new.compactions = list(self.compactions)
        return new


# ---------------------------------------------------------------------------
# The stat.
# ---------------------------------------------------------------------------


def quantile_array(stat: Any, q: np.ndarray, units: Sequence | None) -> xr.DataArray:
    """``stat.quantiles(q)`` ``[C, Q]`` as a DataArray with dims ``(unit, quantile)``."""
    return xr.DataArray(
        stat.quantiles(q).cpu().numpy(),
        dims=("unit", "quantile"),
        coords={**xr_units(units, stat.channels or 0), "quantile": q},
        name="quantile",
    )


def _as_qs(qs: Sequence[float] | float | torch.Tensor | np.ndarray) -> np.ndarray:
    q = np.atleast_1d(np.asarray(qs.cpu() if isinstance(qs, torch.Tensor) else qs, np.float64))
    if q.ndim != 1 or np.isnan(q).any() or (q < 0).any() or (q > 1).any():
        raise ValueError(f"quantiles must be numbers in [0, 1], got {qs!r}")
    return q


class Quantile(Stat):
    """Per-channel streaming quantile sketch with accurate upper tails.

    ``update(x)`` takes ``[N, C]`` batches (see ``nethook.stats.flatten``).
    Readouts: :meth:`quantiles` ``[C, Q]``, :meth:`cdf`, :meth:`min`, :meth:`max`,
    :attr:`count`, :attr:`nan_count`, :meth:`rank_error_bound`, and
    :meth:`quantile_array` / :meth:`to_xarray` for named dims ``(unit, quantile)``.
    See the module docstring for the algorithm and its error bound.

    Args:
        k: capacity of the body's top level (body error ~ 1/k; memory ~3k items).
        tail_k: capacity of the tail stack's top level.
        tail: share of the distribution (the top) the tail stack tracks; the tail
            region covers q >= 1 - tail (approximately; the threshold only rises).
        seed: seed of the compactions' random offsets (results are deterministic).
        k_min: smallest level capacity.
    """

    version = 2  # 2: every level's rows are stored sorted (1: in arrival order)

    def __init__(
        self,
        k: int = 4096,
        tail_k: int = 1024,
        tail: float = 0.02,
        seed: int = 0,
        k_min: int = 32,
    ):
        if k < 2 or tail_k < 2 or k_min < 2:
            raise ValueError(f"k, tail_k and k_min must be >= 2, got {k}, {tail_k}, {k_min}")
        if not 0.0 < tail < 0.5:
            raise ValueError(f"tail must be a share in (0, 0.5), got {tail}")
        self.k = int(k)
        self.tail_k = int(tail_k)
        self.tail = float(tail)
        self.seed = int(seed)
        self.k_min = int(k_min) + int(k_min) % 2
        self.channels: int | None = None
        self.count = 0
        self._device = torch.device("cpu")
        self._dtype = torch.float32
        self._body = _Levels(self.k, self.k_min, self.seed, 0)
        self._tail = _Levels(self.tail_k, self.k_min, self.seed, 1)
        self._tail_active = False
        self._raised_at = 0
        self._threshold: Array | None = None
        self._nan: Array | None = None
        self._min: Array | None = None
        self._max: Array | None = None
        self._cache: dict[str, Any] = {}

    # ------------------------------------------------------------------ update
    @property
    def device(self) -> torch.device:
        """The device the state lives on (numpy arrays when CPU)."""
        return self._device

    @property
    def nan_count(self) -> torch.Tensor:
        """NaN values seen per channel ``[C]`` (int64); they are excluded from ranks."""
        self._require()
        return torch.as_tensor(self._nan).to(self._device)

    def _init(self, channels: int, device: torch.device, dtype: torch.dtype) -> None:
        self.channels = channels
        self._device = device
        self._dtype = torch.float64 if dtype == torch.float64 else torch.float32
        np_dtype = np.float64 if self._dtype == torch.float64 else np.float32

        def full(value: float, dt=np_dtype) -> Array:
            return _to_device(np.full(channels, value, dt), device)

        self._threshold = full(np.inf)
        self._nan = full(0, np.int64)
        self._min = full(np.inf)
        self._max = full(-np.inf)

    def update(self, x: torch.Tensor) -> None:
        """Add a batch ``x`` of shape ``[N, C]`` (any real dtype, any device)."""
        x = check_batch(x, self.channels, "Quantile")
        if x.is_complex():
            raise ValueError(f"Quantile.update expects real values, got dtype {x.dtype}")
        if x.shape[1] == 0:
            raise ValueError("Quantile.update expects at least one channel, got shape [N, 0]")
        if self.channels is None:
            self._init(x.shape[1], x.device, x.dtype)
        elif x.device != self._device:
            self.to(x.device)
        if x.shape[0] == 0:
            return
        self._cache.clear()
        if _numpy_on(self._device):
            self._update_numpy(_numpy_batch(x, self._dtype))
        else:
            rows = x.detach().to(self._dtype).t().contiguous()
            self._update_torch(rows.clone() if rows.data_ptr() == x.data_ptr() else rows)
        self.count += x.shape[0]
        self._settle()

    def _update_numpy(self, a: np.ndarray) -> None:
        """CPU path on the ``[B, C]`` batch as is (no full transpose)."""
        lo, hi = _reduce_columns(np.minimum, a), _reduce_columns(np.maximum, a)
        has_nan = bool(np.isnan(hi).any())  # max propagates NaN
        if has_nan:
            self._nan = self._nan + _reduce_columns(np.add, np.isnan(a), np.int64)
            lo, hi = _reduce_columns(np.fmin, a), _reduce_columns(np.fmax, a)
        self._min = np.fmin(self._min, lo)
        self._max = np.fmax(self._max, hi)
        if self._tail_active:
            selected = _select_columns(a, self._threshold, has_nan)
            if selected.shape[1]:
                self._tail.extend(selected)
            self._body.extend_compacted(a)
        else:
            self._body.extend(_transpose(a))

    def _update_torch(self, rows: torch.Tensor) -> None:
        """Accelerator path on ``[C, B]`` rows."""
        isnan = torch.isnan(rows)
        self._nan = self._nan + isnan.sum(1)
        self._min = torch.fmin(self._min, rows.masked_fill(isnan, np.inf).amin(1))
        self._max = torch.fmax(self._max, rows.masked_fill(isnan, -np.inf).amax(1))
        if self._tail_active:
            self._route_to_tail(rows)
        self._body.extend(rows)

    def _route_to_tail(self, rows: Array, nan: bool = True) -> None:
        """Send every value ``> threshold`` (and NaN) of ``[C, B]`` rows to the tail."""
        selected = _select_above(rows, self._threshold, nan)
        if selected.shape[1]:
            self._tail.extend(selected)

    def _settle(self) -> None:
        """Compact both stacks; start or raise the tail threshold when due."""
        if not self._tail_active and self._body.size() > self._body.budget():
            self._activate_tail()
        self._body.compress()
        if self._tail_active:
            if self.count >= 2 * self._raised_at:
                self._raise_threshold()
            self._tail.compress()

    def _activate_tail(self) -> None:
        """Start the tail from the body's raw items (exact: nothing compacted yet)."""
        raw = self._body.level(0)
        valid = _numpy(self.count - self._nan)
        index = np.clip(np.floor((1.0 - self.tail) * valid).astype(np.int64), 0, raw.shape[1] - 1)
        ordered = _numpy(raw)
        t = np.take_along_axis(ordered, index[:, None], 1)[:, 0]
        self._threshold = _to_device(
            np.where(valid > 0, t, np.inf).astype(ordered.dtype), self._device
        )
        self._tail_active = True
        self._raised_at = self.count
        self._route_to_tail(raw)

    def _raise_threshold(self) -> None:
        """Lift each threshold to the tail's estimate of the ``1 - tail`` quantile."""
        self._raised_at = self.count
        if not self._tail.size():
            return
        # Tail items' estimated count <= them is N - W_tail + (their cumulative weight).
        target = (1.0 - self.tail) * self._valid() - self.count + self._tail.weight()
        new = self._tail.select(target[:, None], self._nan_rows())[:, 0]
        new = np.where(np.isnan(new), -np.inf, new).astype(_numpy(self._threshold).dtype)
        self._threshold = _to_device(np.maximum(_numpy(self._threshold), new), self._device)
        self._tail.prune(self._threshold)

    # ------------------------------------------------------------------ merge
    def merge(self, other: Quantile) -> None:
        """Fold ``other`` (same channels, k, tail_k, tail, k_min) into this sketch."""
        self._check_merge(other, "channels", "k", "tail_k", "tail", "k_min")
        if other.channels is None or other.count == 0:
            return
        if self.channels is None or self.count == 0:
            self.load_state_dict({**other.state_dict(), "seed": self.seed})
            return
        other = other.copy().to(self._device)
        if self._dtype != other._dtype:
            raise ValueError(
                f"cannot merge a Quantile storing {other._dtype} into one storing {self._dtype}"
            )
        self._cache.clear()
        if self._tail_active and other._tail_active:
            self._threshold = (
                np.maximum(self._threshold, other._threshold)
                if _is_np(self._threshold)
                else torch.maximum(self._threshold, other._threshold)
            )
            self._tail.absorb(other._tail)
            self._tail.prune(self._threshold)
        elif self._tail_active:
            self._route_to_tail(other._body.level(0))
        elif other._tail_active:
            mine = self._body.level(0)
            self._tail = other._tail.copy()
            self._threshold = other._threshold
            self._tail_active = True
            self._route_to_tail(mine)
        self._body.absorb(other._body)
        self._nan = self._nan + other._nan
        minimum, maximum = (np.fmin, np.fmax) if _is_np(self._min) else (torch.fmin, torch.fmax)
        self._min = minimum(self._min, other._min)
        self._max = maximum(self._max, other._max)
        self._raised_at = max(self._raised_at, other._raised_at)
        self.count += other.count
        self._settle()

    def copy(self) -> Quantile:
        """An independent copy of this sketch."""
        new = Quantile(self.k, self.tail_k, self.tail, self.seed, self.k_min)
        new.load_state_dict(self.state_dict())
        return new.to(self._device)

    # ------------------------------------------------------------------ readout
    def _require(self) -> None:
        if self.channels is None:
            raise ValueError("Quantile has seen no data yet")

    def _valid(self) -> np.ndarray:
        return (self.count - _numpy(self._nan)).astype(np.float64)

    def _nan_rows(self) -> np.ndarray:
        """``[C]`` mask of the channels that hold NaN items (their readouts sort)."""
        return _numpy(self._nan) > 0

    def _tail_region(self, r: np.ndarray) -> np.ndarray:
        """``[C, Q]`` mask of the target counts ``r`` that the tail stack answers."""
        if not (self._tail_active and self._tail.size()):
            return np.zeros(r.shape, bool)
        if "at_most" not in self._cache:
            # Estimated count <= threshold: N - (tail weight above it).
            at_most = self._tail.weight_at_most(self._threshold[:, None])[:, 0]
            self._cache["at_most"] = self.count - self._tail.weight() + at_most
        return r > self._cache["at_most"][:, None]

    def _answers(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[C, Q]`` quantile answers and a mask of those the tail stack gave.

        Each stack answers only the columns (quantiles) where some channel needs
        it, so tail quantiles (dissection thresholds) never search the body.
        """
        valid = self._valid()
        r = q[None, :] * valid[:, None]
        region = self._tail_region(r)
        inner = (q > 0) & (q < 1)
        out = np.zeros(r.shape)
        exact = self._nan_rows()
        body = np.flatnonzero((~region & inner).any(0))
        if body.size:
            out[:, body] = self._body.select(r[:, body], exact)
        tail = np.flatnonzero((region & inner).any(0))
        if tail.size:
            shift = float(self.count - self._tail.weight())
            answers = self._tail.select(r[:, tail] - shift, exact)
            out[:, tail] = np.where(region[:, tail], answers, out[:, tail])
        lo, hi = _numpy(self._min)[:, None], _numpy(self._max)[:, None]
        out = np.where(np.isnan(out), hi, out)  # NaN items sort above every value
        out = np.minimum(np.maximum(out, lo), hi)
        out = np.where(q[None, :] == 0, lo, np.where(q[None, :] == 1, hi, out))
        return np.where(valid[:, None] > 0, out, np.nan).astype(lo.dtype), region

    def quantiles(self, qs: Sequence[float] | float | torch.Tensor) -> torch.Tensor:
        """Per-channel quantiles ``[C, len(qs)]`` on the stat's device (NaN if no data).

        Each answer is a stored value (no interpolation) whose rank is within
        :meth:`rank_error_bound` of ``q``; ``q = 0`` and ``q = 1`` give the exact
        minimum and maximum. The last answers are kept until the next change, so
        asking again for the same ``qs`` costs nothing.
        """
        self._require()
        q = _as_qs(qs)
        last = self._cache.get("quantiles")
        if last is None or not np.array_equal(last[0], q):
            last = self._cache["quantiles"] = (q, np.ascontiguousarray(self._answers(q)[0]))
        return torch.from_numpy(last[1].copy()).to(self._device)

    def cdf(self, values: torch.Tensor | np.ndarray | float) -> torch.Tensor:
        """Estimated share of each channel's (non-NaN) values ``<= values``.

        ``values`` is ``[C]`` (one per channel) or ``[C, V]`` (or a scalar, used for
        every channel); the result has the same shape (float64, NaN for NaN
        queries or channels without data), within :meth:`rank_error_bound`.
        """
        self._require()
        v = torch.as_tensor(values).detach().cpu().double().numpy()
        shape = v.shape
        if v.ndim == 0:
            v = np.full((self.channels, 1), float(v))
            shape = (self.channels,)
        elif v.ndim == 1 and v.shape[0] == self.channels:
            v = v[:, None]
        elif not (v.ndim == 2 and v.shape[0] == self.channels):
            raise ValueError(
                f"cdf expects values of shape [{self.channels}] or [{self.channels}, V], "
                f"got {tuple(shape)}"
            )
        store = v.astype(np.float64 if self._dtype == torch.float64 else np.float32)
        query = _to_device(np.ascontiguousarray(store), self._device)
        valid = self._valid()[:, None]
        count = _numpy(self._body.weight_at_most(query)).astype(np.float64)
        if self._tail_active and self._tail.size():
            tail = self.count - self._tail.weight() + _numpy(self._tail.weight_at_most(query))
            count = np.where(v > _numpy(self._threshold)[:, None], tail, count)
        count = np.clip(count, 0, valid)
        count = np.where(v < _numpy(self._min)[:, None], 0, count)
        count = np.where(v >= _numpy(self._max)[:, None], valid, count)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(np.isnan(v) | (valid == 0), np.nan, count / valid)
        return torch.from_numpy(out.reshape(shape)).to(self._device)

    def rank_error_bound(
        self, qs: Sequence[float] | None = None, delta: float = 1e-6
    ) -> torch.Tensor:
        """Rank-error bound holding with probability ``>= 1 - delta`` per answer.

        ``qs=None``: ``[C]``, the bound for any rank (the body's, or the tail's if
        larger). With ``qs``: ``[C, Q]``, the bound of the stack answering each q.
        It is ``sqrt(2 V ln(2/delta)) / n`` (see the module docstring); 0 while
        nothing has been compacted.
        """
        self._require()
        valid = np.maximum(self._valid(), 1.0)
        scale = np.sqrt(2.0 * np.log(2.0 / delta)) / valid
        body = np.sqrt(self._body.variance()) * scale
        tail = np.sqrt(self._tail.variance()) * scale
        if qs is None:
            return torch.from_numpy(np.maximum(body, tail))
        region = self._tail_region(_as_qs(qs)[None, :] * self._valid()[:, None])
        return torch.from_numpy(np.where(region, tail[:, None], body[:, None]))

    def min(self) -> torch.Tensor:
        """Exact per-channel minimum of the non-NaN values ``[C]`` (NaN if none)."""
        return self._extreme(self._min)

    def max(self) -> torch.Tensor:
        """Exact per-channel maximum of the non-NaN values ``[C]`` (NaN if none)."""
        return self._extreme(self._max)

    def _extreme(self, value: Array) -> torch.Tensor:
        self._require()
        out = np.where(self._valid() > 0, _numpy(value), np.nan)
        return torch.from_numpy(out.astype(_numpy(value).dtype)).to(self._device)

    def nbytes_per_channel(self) -> int:
        """Bytes of state per channel now (stored items plus per-channel scalars)."""
        item = 8 if self._dtype == torch.float64 else 4
        return (self._body.size() + self._tail.size()) * item + 3 * item + 8

    def max_nbytes_per_channel(self, n: int | None = None) -> int:
        """Upper bound of :meth:`nbytes_per_channel` after ``n`` values (default: count).

        Both stacks' budgets at their most levels (the tail is fed at most ``n``
        values too). With the defaults and float32: under 64 KiB up to ``n = 2**36``,
        plus 256 bytes per further doubling of ``n``.
        """
        n = self.count if n is None else int(n)
        item = 8 if self._dtype == torch.float64 else 4
        items = sum(s.budget(s.max_levels(n)) for s in (self._body, self._tail))
        return items * item + 3 * item + 8

    def quantile_array(self, qs: Sequence[float], units: Sequence | None = None) -> xr.DataArray:
        """:meth:`quantiles` as a DataArray with dims ``(unit, quantile)``."""
        return quantile_array(self, _as_qs(qs), units)

    def to_xarray(
        self, units: Sequence | None = None, qs: Sequence[float] = (0.01, 0.5, 0.99, 0.995)
    ) -> xr.Dataset:
        """``quantiles`` ``(unit, quantile)``, ``min``, ``max``, ``nan_count`` ``(unit)``."""
        coords = xr_units(units, self.channels or 0)
        return xr.Dataset(
            {
                "quantiles": self.quantile_array(qs, units),
                "min": ("unit", self.min().cpu().numpy()),
                "max": ("unit", self.max().cpu().numpy()),
                "nan_count": ("unit", self.nan_count.cpu().numpy()),
            },
            coords=coords,
            attrs={"count": self.count},
        )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Plain-data state: options, counters, thresholds and both stacks' items."""
        sd: dict[str, Any] = {
            **self._header(),
            "k": self.k,
            "tail_k": self.tail_k,
            "tail": self.tail,
            "seed": self.seed,
            "k_min": self.k_min,
            "count": int(self.count),
            "dtype": "float64" if self._dtype == torch.float64 else "float32",
        }
        if self.channels is None:
            return sd
        sd.update(
            channels=int(self.channels),
            tail_active=int(self._tail_active),
            raised_at=int(self._raised_at),
            threshold=np.array(_numpy(self._threshold), copy=True),
            nan_count=np.array(_numpy(self._nan), copy=True),
            min=np.array(_numpy(self._min), copy=True),
            max=np.array(_numpy(self._max), copy=True),
            body=self._body.state(),
            tail_levels=self._tail.state(),
        )
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict` (on the current device)."""
        self._check_header(sd)
        device = getattr(self, "_device", torch.device("cpu"))
        Quantile.__init__(
            self,
            int(sd["k"]),
            int(sd["tail_k"]),
            float(sd["tail"]),
            int(sd["seed"]),
            int(sd["k_min"]),
        )
        self._device = device
        self.count = int(sd["count"])
        self._dtype = torch.float64 if str(np.asarray(sd["dtype"])) == "float64" else torch.float32
        if "channels" not in sd:
            return
        self.channels = int(sd["channels"])
        self._tail_active = bool(int(sd["tail_active"]))
        self._raised_at = int(sd["raised_at"])
        for name in ("threshold", "min", "max"):
            setattr(self, "_" + name, _to_device(np.array(sd[name], copy=True), device))
        self._nan = _to_device(np.array(sd["nan_count"], np.int64), device)
        presorted = int(np.asarray(sd["version"])) >= 2  # version 1 kept levels unsorted
        self._body.load(sd["body"], device, presorted)
        self._tail.load(sd["tail_levels"], device, presorted)

    def to(self, device: torch.device | str) -> Quantile:
        """Move the state to ``device`` (numpy arrays on CPU, torch tensors elsewhere)."""
        self._device = torch.device(device)
        self._cache.clear()
        if self.channels is not None:
            for name in ("threshold", "nan", "min", "max"):
                setattr(self, "_" + name, _to_device(getattr(self, "_" + name), self._device))
            self._body.to(self._device)
            self._tail.to(self._device)
        return self

    def __repr__(self) -> str:
        return (
            f"Quantile(channels={self.channels}, count={self.count}, k={self.k}, "
            f"tail_k={self.tail_k}, tail={self.tail})"
        )
