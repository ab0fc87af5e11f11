"""Per-channel quantiles of the top share of a stream: the Quantile sketch's tail, alone.

Dissection needs one number per unit, the activation reached by the top 0.5% of all
positions. :class:`~nethook.stats.Quantile` answers every rank, so its body sees every
value; here only the values above a per-channel *floor* are sketched. The floor
trails the value with ``R = margin * share * total`` values above it among those seen
so far (``total``: the values per channel the whole stream will have; without it,
``count`` so far). Since the ``R``-th largest value of a prefix is at most the
``R``-th largest of the whole stream, and ``R >= share * total``, every value at or
above the stream's ``1 - share`` quantile is above the floor when it arrives,
whatever the order of the data. One comparison per value decides; a few percent of
the values reach the compactor stack (the same KLL-style :class:`_Levels` as
Quantile's tail, so the same error analysis holds), which is what makes an update
several times cheaper than Quantile's.

Answers are as in Quantile: a value seen, whose estimated rank is within
:meth:`TopQuantile.rank_error_bound` of the target; since the stack only holds weight
of order ``R``, that error is a fraction of ``R``, not of the stream. The floor sits
just below the value it tracks, so ties with that value are kept and an answer equal
to it is certified. Where that value is the channel's minimum so far (a ReLU unit
silent at more than ``1 - margin * share`` of its positions) the floor is the value
itself and the values equal to it are counted exactly instead of sketched, so an
answer there is certified too. An answer below the floor cannot be (the floor
overtook it, which the rule above prevents up to the sketch's error);
:meth:`TopQuantile.uncertain` flags such answers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr

from nethook.stats.base import Stat, xr_units
from nethook.stats.quantile import (  # the Quantile sketch's compactor and kernels
    Array,
    _as_qs,
    _cat,
    _is_np,
    _Levels,
    _numpy,
    _numpy_on,
    _to_device,
    quantile_array,
)

_RAISE_GROWTH = 1.25  # raise the floor once the count has grown by this factor
_START_STRIDE = 7  # the first floor's candidate: every 7th value (odd: every column of a map)


class TopQuantile(Stat):
    """Streaming per-channel quantiles ``q >= 1 - share``, sketching only the top values.

    ``update(x)`` takes ``[N, C]`` or ``[N, C, *spatial]`` (channels on axis 1; every
    other axis indexes values, so conv maps need no transposing). Readouts:
    :meth:`quantiles` ``[C, Q]``, :meth:`uncertain`, :meth:`min`, :meth:`max`,
    :attr:`count`, :attr:`floor`, :meth:`rank_error_bound`, :meth:`quantile_array`.
    After each update, :attr:`above` holds the flat indices (into that batch viewed as
    ``[N, C, P]``, ascending) of its values that went to the sketch, those above the
    floor: every value a top quantile can reach is among them (dissection keeps
    just those activations for its second pass); it is None for the updates held
    back by ``warmup``.

    Args:
        share: the top share whose quantiles are asked; quantiles ``q >= 1 - share``.
        total: values per channel the whole stream will have, if known (e.g. images
            times positions). With it the floor is safe in any data order; without
            it the floor assumes the values seen so far are representative.
        margin: the floor trails the ``margin * share`` top share (>= 1; the slack
            absorbs the sketch's own rank error).
        k: capacity of the compactor stack's top level (error ~ 1/k of its weight).
        seed: seed of the compactions' random offsets (results are deterministic).
        k_min: smallest level capacity.
        warmup: values per channel to hold back (copied) before the first floor is
            set, from all of them at once (default: set it at the first update
            with enough values). The floor keeps ``R`` values above it, so it is
            looser the fewer values it is set from: a longer warmup lets fewer of
            the early values through (fewer to sketch, or to keep as dissection
            does), for that much memory. The held values are placed at the update
            that fills the warmup or at the first readout or merge; until then
            :attr:`floor` is -inf. They are part of the state.
    """

    version = 1

    def __init__(
        self,
        share: float = 0.01,
        total: int | None = None,
        margin: float = 2.0,
        k: int = 1024,
        seed: int = 0,
        k_min: int = 32,
        warmup: int | None = None,
    ):
        if not 0.0 < share < 0.5:
            raise ValueError(f"share must be a top share in (0, 0.5), got {share}")
        if total is not None and int(total) < 1:
            raise ValueError(f"total must be a positive count of values (or None), got {total}")
        if margin < 1.0:
            raise ValueError(f"margin must be >= 1, got {margin}")
        if k < 2 or k_min < 2:
            raise ValueError(f"k and k_min must be >= 2, got {k}, {k_min}")
        if warmup is not None and int(warmup) < 0:
            raise ValueError(f"warmup must be a count of values >= 0 (or None), got {warmup}")
        self.share = float(share)
        self.total = None if total is None else int(total)
        self.margin = float(margin)
        self.k = int(k)
        self.seed = int(seed)
        self.k_min = int(k_min) + int(k_min) % 2
        self.warmup = None if warmup is None else int(warmup)
        self._held: list[Array] = []  # rows [C, m] held back by the warmup
        self.channels: int | None = None
        self.count = 0
        self._device = torch.device("cpu")
        self._dtype = torch.float32
        self._levels = _Levels(self.k, self.k_min, self.seed, 2)
        self._floor: Array | None = None
        self.above: Array | None = None
        self._raised_at = 0
        self._min: Array | None = None
        self._max: Array | None = None

    # ------------------------------------------------------------------ update
    @property
    def device(self) -> torch.device:
        """The device the state lives on (numpy arrays when CPU)."""
        return self._device

    @property
    def floor(self) -> torch.Tensor:
        """Per-channel floor ``[C]``: every value above it has been sketched (-inf
        while the warmup holds the first values)."""
        self._require(place=False)
        return torch.as_tensor(_numpy(self._floor)).to(self._device)

    @property
    def holding(self) -> bool:
        """Whether the warmup holds values back (not yet placed, the floor not set)."""
        return bool(self._held)

    def _keep(self) -> int:
        """``R``: how many of the largest values the floor keeps above it."""
        n = self.total if self.total is not None else self.count
        return max(1, math.ceil(self.margin * self.share * n))

    def update(self, x: torch.Tensor | np.ndarray) -> None:
        """Add ``x`` ``[N, C, *spatial]`` (or ``[N, C]``), real-valued and without NaN."""
        x = torch.as_tensor(x)
        if x.ndim < 2 or x.shape[1] == 0:
            raise ValueError(
                f"TopQuantile.update expects [N, C] or [N, C, *spatial] with C >= 1, "
                f"got shape {tuple(x.shape)}"
            )
        if x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"TopQuantile.update expects real numbers, got dtype {x.dtype}")
        if self.channels is None:
            self._init(x.shape[1], x.device, x.dtype)
        elif x.shape[1] != self.channels:
            raise ValueError(f"TopQuantile has {self.channels} channels, got {x.shape[1]}")
        elif x.device != self._device:
            self.to(x.device)
        values = x.shape[0] * int(np.prod(x.shape[2:], dtype=np.int64))
        if values == 0:
            self.above = np.zeros(0, np.int64)
            return
        dtype = torch.float64 if self._dtype == torch.float64 else torch.float32
        x = x.detach().to(dtype).reshape(x.shape[0], self.channels, -1)
        a: Array = x.numpy() if self._numpy else x
        lo, hi = _channel_reduce(a, "min"), _channel_reduce(a, "max")
        if bool(_isnan(hi).any()):
            bad = np.flatnonzero(np.isnan(_numpy(hi)))[:10].tolist()
            raise ValueError(f"TopQuantile.update got NaN values in channels {bad}")
        self._min = _minimum(self._min, lo)
        self._max = _maximum(self._max, hi)
        self.count += values
        if self._raised_at == 0 and self.warmup:
            self._held.append(_rows(a))
            self.above = None
            if self.count >= self.warmup:
                self.settle()
            return
        if self._raised_at == 0 and values > 2 * self._keep():
            self._raised_at = self.count
            self._start_floor(_rows(a))
        self._place(a)

    def _place(self, a: Array) -> None:
        """Send the values of ``a`` ``[N, C, P]`` above the floor to the stack."""
        self._count_ties(a)
        rows, self.above = _above(a, self._floor)
        self._levels.extend(rows)
        self._levels.compress()
        due = self.count >= _RAISE_GROWTH * self._raised_at
        if due and self._levels.weight() > 2 * self._keep():
            self._raise_floor()

    def settle(self) -> None:
        """Place the values the warmup holds now: set the first floor from them and send
        those above it to the stack (readouts and merges do this themselves)."""
        if not self._held:
            return
        rows = _cat(self._held)
        self._held = []
        self._raised_at = self.count
        if rows.shape[1] > 2 * self._keep():
            self._start_floor(rows)
        self._place(rows[None])
        self.above = None

    @property
    def _numpy(self) -> bool:
        return _numpy_on(self._device)

    def _init(self, channels: int, device: torch.device, dtype: torch.dtype) -> None:
        self.channels = int(channels)
        self._device = device
        self._dtype = torch.float64 if dtype == torch.float64 else torch.float32
        np_dtype = np.float64 if self._dtype == torch.float64 else np.float32
        self._floor = _to_device(np.full(channels, -np.inf, np_dtype), device)
        self._tied = np.zeros(channels, bool)
        self._ties = np.zeros(channels, np.int64)
        self._min = _to_device(np.full(channels, np.inf, np_dtype), device)
        self._max = _to_device(np.full(channels, -np.inf, np_dtype), device)

    def _start_floor(self, rows: Array) -> None:
        """Set the first floor from rows ``[C, m]`` that hold more than ``2 R`` values a channel.

        The floor must have at least ``R`` of these values above it. A candidate
        comes from every 7th value (its estimate of the ``1.25 R``-th largest, a
        selection a seventh the size), and an exact count over all of them checks it
        (a candidate at the rows' minimum is the answer when fewer than ``R`` values
        lie above it); rows it fails (rare) take the exact ``R``-th largest.
        """
        keep = self._keep()
        sample = rows[:, ::_START_STRIDE]
        value = _kth_largest(sample, max(1, 5 * keep // (4 * _START_STRIDE) + 1))
        above = rows > value[:, None]
        count = _numpy(above.sum(1) if not _is_np(rows) else np.count_nonzero(above, axis=1))
        # at the minimum, fewer than R values above it make it the R-th largest (ReLU zeros)
        short = np.flatnonzero((count < keep) & (_numpy(value) > _numpy(self._min)))
        value = np.array(_numpy(value), copy=True)
        if short.size:
            index = short if _is_np(rows) else torch.as_tensor(short, device=rows.device)
            value[short] = _numpy(_kth_largest(rows[index], keep + 1))
        self._lift_floor(value)

    def _raise_floor(self) -> None:
        """Lift each floor to the stack's estimate of the value with ``R`` values above it.

        Due when the stack holds more than ``2 R`` and the count has grown by a quarter
        since the last raise (each raise searches the stack's few thousand items a
        channel).
        """
        self._raised_at = self.count
        target = np.full((self.channels, 1), float(self._levels.weight() - self._keep()))
        self._lift_floor(self._levels.select(target, np.zeros(self.channels, bool))[:, 0])

    def _lift_floor(self, value: np.ndarray) -> None:
        """Raise the floor so that ``value`` and everything above it are kept from now on.

        The floor goes just below ``value``, so ties with it are kept and an answer
        equal to it is certified; except where ``value`` is the channel's minimum so
        far (a mostly silent ReLU unit, tied at 0): there the floor is ``value`` itself
        and *tied*, which keeps that mass of ties out of the stack and counts the
        values equal to it exactly instead (:meth:`_count_ties`).
        """
        floor = _numpy(self._floor)
        value = value.astype(floor.dtype)
        tied = value <= _numpy(self._min)
        cut = np.where(tied, value, np.nextafter(value, floor.dtype.type(-np.inf)))
        moved = cut > floor
        self._tied = np.where(moved, tied, self._tied)
        self._ties = np.where(moved, 0, self._ties)
        self._floor = _to_device(np.where(moved, cut, floor), self._device)
        self._prune()

    def _prune(self) -> None:
        """Drop stack items below the floor (tied floors keep the items equal to it)."""
        floor = _numpy(self._floor)
        below = np.where(self._tied, np.nextafter(floor, floor.dtype.type(-np.inf)), floor)
        self._levels.prune(_to_device(below, self._device))

    def _count_ties(self, a: Array) -> None:
        """Count the values equal to each tied floor (they are not sketched)."""
        tied = np.flatnonzero(self._tied)
        if not tied.size:
            return
        floor = _numpy(self._floor)[tied]
        if _is_np(a):
            equal = a[:, tied, :] == floor[None, :, None]
            self._ties[tied] += np.count_nonzero(equal, axis=(0, 2))
        else:
            index = torch.as_tensor(tied, device=a.device)
            value = torch.as_tensor(floor, device=a.device)
            equal = a.index_select(1, index) == value[None, :, None]
            self._ties[tied] += equal.sum((0, 2)).cpu().numpy()

    # ------------------------------------------------------------------ merge
    def merge(self, other: TopQuantile) -> None:
        """Fold ``other`` (same channels, share, total, margin, k, k_min) into this one.

        Values either holds back (``warmup``) are placed first.
        """
        self._check_merge(other, "channels", "share", "total", "margin", "k", "k_min")
        self.settle()
        other.settle()
        if other.channels is None or other.count == 0:
            return
        if self.channels is None or self.count == 0:
            self.load_state_dict({**other.state_dict(), "seed": self.seed})
            return
        other_levels = other._levels.copy()
        other_levels.to(self._device)
        self._levels.absorb(other_levels)
        mine, theirs = _numpy(self._floor), _numpy(other._floor)
        floor = np.maximum(mine, theirs)
        # a tied floor stays tied only if every shard at that floor counted its ties
        at_mine, at_theirs = mine == floor, theirs == floor
        self._tied = (~at_mine | self._tied) & (~at_theirs | other._tied)
        self._ties = np.where(self._tied, self._ties * at_mine + other._ties * at_theirs, 0)
        self._floor = _to_device(floor, self._device)
        self._min = _minimum(self._min, _to_device(_numpy(other._min), self._device))
        self._max = _maximum(self._max, _to_device(_numpy(other._max), self._device))
        self.count += other.count
        self._raised_at = max(self._raised_at, other._raised_at)
        self._prune()
        self._levels.compress()
        if self._levels.weight() > 2 * self._keep():
            self._raise_floor()

    # ------------------------------------------------------------------ readout
    def _require(self, place: bool = True) -> None:
        """Fail without data; place the values the warmup holds (``place``: readouts)."""
        if self.channels is None:
            raise ValueError("TopQuantile has seen no data yet")
        if place:
            self.settle()

    def _check_qs(self, qs) -> np.ndarray:
        q = _as_qs(qs)
        low = q < 1.0 - self.share - 1e-12
        if low.any():
            raise ValueError(
                f"TopQuantile(share={self.share}) answers quantiles >= {1.0 - self.share}, "
                f"got {q[low].tolist()}"
            )
        return q

    def _answers(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[C, Q]`` answers and the mask of those not certified (reported as the floor).

        The stack places an answer above the floor, or says it is at or below it. At a
        tied floor the answer is the floor itself when the values at or above it (the
        stack's, plus the ties counted exactly) outnumber ``(1 - q) n``; anywhere else,
        an answer at or below the floor is not certified.
        """
        n = float(self.count)
        shift = n - self._levels.weight()
        r = np.broadcast_to(q[None, :] * n - shift, (self.channels, len(q)))
        floor = _numpy(self._floor)
        lo, hi = _numpy(self._min)[:, None], _numpy(self._max)[:, None]
        if self._levels.size():
            out = self._levels.select(r, np.zeros(self.channels, bool)).astype(np.float64)
        else:
            out = np.full(r.shape, -np.inf)
        below = (r <= 0) | (out <= floor[:, None])
        if below.any() and self._tied.any():
            under = np.nextafter(floor, floor.dtype.type(-np.inf))[:, None]
            stack_under = self._levels.weight_at_most(_to_device(under, self._device))
            at_least = self._levels.weight() - stack_under[:, 0] + self._ties
            tie = self._tied[:, None] & (at_least[:, None] > n - q[None, :] * n)
        else:
            tie = np.zeros(below.shape, bool)
        out = np.where(below, floor.astype(np.float64)[:, None], out)
        out = np.minimum(np.maximum(out, lo), hi)
        out = np.where(q[None, :] == 1, hi, out)
        uncertain = below & ~tie & (q[None, :] < 1)
        return out.astype(lo.dtype), uncertain

    def quantiles(self, qs: Sequence[float] | float | torch.Tensor) -> torch.Tensor:
        """Per-channel quantiles ``[C, len(qs)]`` for ``qs >= 1 - share``.

        Each answer is a value seen (inverted-CDF definition: the smallest value whose
        share of values at or below it reaches ``q``), within :meth:`rank_error_bound`
        of ``q``; ``q = 1`` is the exact maximum. An answer that cannot be certified
        is reported as the floor, an upper bound (see :meth:`uncertain`).
        """
        self._require()
        return torch.from_numpy(np.ascontiguousarray(self._answers(self._check_qs(qs))[0])).to(
            self._device
        )

    def uncertain(self, qs: Sequence[float] | float | torch.Tensor) -> torch.Tensor:
        """``[C, Q]`` bool: answers not certified (the floor rose above them).

        Such an answer is reported as the floor, an upper bound of the true value.
        It does not happen with ``total`` given, up to the sketch's error.
        """
        self._require()
        return torch.from_numpy(self._answers(self._check_qs(qs))[1].copy())

    def rank_error_bound(self, delta: float = 1e-6) -> torch.Tensor:
        """``[C]`` bound on an answer's rank error (as a share of ``count``), w.p. ``1 - delta``.

        ``sqrt(2 V ln(2/delta)) / count`` with ``V`` the stack's compaction variance
        (Azuma-Hoeffding, as for :class:`~nethook.stats.Quantile`); 0 while nothing
        has been compacted.
        """
        self._require()
        bound = math.sqrt(2.0 * self._levels.variance() * math.log(2.0 / delta))
        return torch.full((self.channels,), bound / max(self.count, 1), dtype=torch.float64)

    def min(self) -> torch.Tensor:
        """Exact per-channel minimum ``[C]``."""
        self._require()
        return torch.as_tensor(_numpy(self._min).copy()).to(self._device)

    def max(self) -> torch.Tensor:
        """Exact per-channel maximum ``[C]``."""
        self._require()
        return torch.as_tensor(_numpy(self._max).copy()).to(self._device)

    def quantile_array(self, qs: Sequence[float], units: Sequence | None = None) -> xr.DataArray:
        """:meth:`quantiles` as a DataArray with dims ``(unit, quantile)``."""
        return quantile_array(self, self._check_qs(qs), units)

    def to_xarray(self, units: Sequence | None = None, qs: Sequence[float] | None = None):
        """``quantiles`` ``(unit, quantile)`` (default ``1 - share``), ``min``, ``max``, ``floor``."""
        qs = [1.0 - self.share] if qs is None else qs
        return xr.Dataset(
            {
                "quantiles": self.quantile_array(qs, units),
                "min": ("unit", self.min().cpu().numpy()),
                "max": ("unit", self.max().cpu().numpy()),
                "floor": ("unit", self.floor.cpu().numpy()),
            },
            coords=xr_units(units, self.channels or 0),
            attrs={"count": self.count, "share": self.share},
        )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Plain-data state: options, counters, floors, extremes and the stack's items."""
        sd: dict[str, Any] = {
            **self._header(),
            "share": self.share,
            "total": -1 if self.total is None else self.total,
            "margin": self.margin,
            "k": self.k,
            "seed": self.seed,
            "k_min": self.k_min,
            "warmup": -1 if self.warmup is None else self.warmup,
            "count": int(self.count),
            "dtype": "float64" if self._dtype == torch.float64 else "float32",
        }
        if self.channels is None:
            return sd
        sd.update(
            channels=int(self.channels),
            raised_at=int(self._raised_at),
            floor=np.array(_numpy(self._floor), copy=True),
            tied=self._tied.copy(),
            ties=self._ties.copy(),
            min=np.array(_numpy(self._min), copy=True),
            max=np.array(_numpy(self._max), copy=True),
            levels=self._levels.state(),
        )
        if self._held:
            sd["held"] = np.array(_numpy(_cat(self._held)), copy=True)
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict` (on the current device)."""
        self._check_header(sd)
        device = getattr(self, "_device", torch.device("cpu"))
        total = int(sd["total"])
        TopQuantile.__init__(
            self,
            float(sd["share"]),
            None if total < 0 else total,
            float(sd["margin"]),
            int(sd["k"]),
            int(sd["seed"]),
            int(sd["k_min"]),
            None if int(sd.get("warmup", -1)) < 0 else int(sd["warmup"]),
        )
        self._device = device
        self.count = int(sd["count"])
        self._dtype = torch.float64 if str(np.asarray(sd["dtype"])) == "float64" else torch.float32
        if "channels" not in sd:
            return
        self.channels = int(sd["channels"])
        self._raised_at = int(sd["raised_at"])
        self._tied = np.array(sd["tied"], bool)
        self._ties = np.array(sd["ties"], np.int64)
        for name in ("floor", "min", "max"):
            setattr(self, "_" + name, _to_device(np.array(sd[name], copy=True), device))
        self._levels.load(sd["levels"], device, presorted=True)
        if "held" in sd:
            self._held = [_to_device(np.array(sd["held"], copy=True), device)]

    def to(self, device: torch.device | str) -> TopQuantile:
        """Move the state to ``device`` (numpy arrays on CPU, torch tensors elsewhere)."""
        self._device = torch.device(device)
        if self.channels is not None:
            for name in ("floor", "min", "max"):
                setattr(self, "_" + name, _to_device(getattr(self, "_" + name), self._device))
            self._levels.to(self._device)
            self._held = [_to_device(rows, self._device) for rows in self._held]
        return self

    def __repr__(self) -> str:
        return (
            f"TopQuantile(channels={self.channels}, count={self.count}, share={self.share}, "
            f"total={self.total}, k={self.k})"
        )


# ---------------------------------------------------------------------------
# Kernels on [N, C, P] arrays: numpy on CPU, torch elsewhere.
# ---------------------------------------------------------------------------


def _isnan(a: Array) -> np.ndarray:
    return np.isnan(_numpy(a))


def _minimum(a: Array, b: Array) -> Array:
    return np.minimum(a, b) if _is_np(a) else torch.minimum(a, b)


def _maximum(a: Array, b: Array) -> Array:
    return np.maximum(a, b) if _is_np(a) else torch.maximum(a, b)


def _channel_reduce(a: Array, how: str) -> Array:
    """Per-channel min or max ``[C]`` of ``[N, C, P]`` (NaN propagates)."""
    if _is_np(a):  # over images first: long contiguous runs, whatever the map size
        ufunc = np.minimum if how == "min" else np.maximum
        return ufunc.reduce(ufunc.reduce(a, axis=0), axis=1)
    return a.amin((0, 2)) if how == "min" else a.amax((0, 2))


def _kth_largest(rows: Array, k: int) -> Array:
    """Per row of ``[C, m]``, the ``k``-th largest value (``k`` clipped to ``1 .. m``)."""
    m = rows.shape[1]
    kth = m - min(max(k, 1), m)
    if _is_np(rows):
        return np.partition(rows, kth, axis=1)[:, kth]
    return torch.kthvalue(rows, kth + 1, dim=1).values


def _rows(a: Array) -> Array:
    """``[N, C, P]`` as contiguous per-channel rows ``[C, N * P]``."""
    n, c, p = a.shape
    if _is_np(a):
        return np.ascontiguousarray(a.transpose(1, 0, 2)).reshape(c, n * p)
    return a.transpose(0, 1).reshape(c, n * p).contiguous()


def _above(a: Array, floor: Array) -> tuple[Array, Array]:
    """Each channel's values ``> floor[c]`` of ``[N, C, P]``, and where they were.

    Returns ``[C, m]`` rows padded with -inf (the padding sorts below every value, so
    it only counts as "at or below" a query, which the stat accounts for: ``count -
    weight`` of the stack) and the flat indices of the values into ``a``, ascending.
    The hits are found in one pass and grouped by channel with a stable sort of
    their channel numbers (16-bit keys: a radix sort).
    """
    n, c, p = a.shape
    if _is_np(a):
        flat = np.flatnonzero(a > floor[None, :, None])
        channel = (flat // p) % c if p > 1 else flat % c
        counts = np.bincount(channel, minlength=c)
        out = np.full((c, int(counts.max(initial=0))), -np.inf, a.dtype)
        if flat.size and n == 1:  # rows [C, m]: the hits come grouped by channel
            start = np.cumsum(counts) - counts
            out[channel, np.arange(channel.size) - start[channel]] = a.reshape(-1)[flat]
        elif flat.size:
            keys = channel.astype(np.uint16) if c <= np.iinfo(np.uint16).max else channel
            order = np.argsort(keys, kind="stable")
            channel = channel[order]
            start = np.cumsum(counts) - counts
            out[channel, np.arange(channel.size) - start[channel]] = a.reshape(-1)[flat[order]]
        return out, flat
    flat = torch.nonzero((a > floor[None, :, None]).reshape(-1)).reshape(-1)
    channel = torch.div(flat, p, rounding_mode="floor") % c
    counts = torch.bincount(channel, minlength=c)
    out = torch.full((c, int(counts.max()) if flat.numel() else 0), -np.inf, dtype=a.dtype)
    out = out.to(a.device)
    if flat.numel():
        channel, order = torch.sort(channel, stable=True)
        start = torch.cumsum(counts, 0) - counts
        slot = torch.arange(channel.numel(), device=a.device) - start[channel]
        out[channel, slot] = a.reshape(-1)[flat[order]]
    return out, flat
