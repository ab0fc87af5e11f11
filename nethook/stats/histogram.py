"""Per-channel histograms (fixed or data-derived bins) and per-channel bincounts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr

from nethook.stats.base import Stat, as_tensor, check_batch, to_numpy, xr_units

_FIXED, _ADAPTIVE = "fixed", "adaptive"


class Histogram(Stat):
    """Per-channel histogram of ``[N, C]`` data: exact counts, exactly mergeable.

    Two kinds of bins:

    - **fixed**: ``Histogram(edges=e)`` with ``e`` of shape ``[B+1]`` (shared) or
      ``[C, B+1]`` (per channel), or ``Histogram(bins=B, range=(lo, hi))`` for ``B``
      equal bins. Bins are half-open ``[e_i, e_{i+1})`` except the last, which also
      holds ``e_B`` (numpy's convention); values outside go to ``underflow`` and
      ``overflow``.
    - **data-derived** (the default, ``Histogram(bins=B)``): each channel gets ``B``
      bins of width ``2**e`` aligned to multiples of that width, with ``e`` the
      smallest integer (at least ``log2(min_width)``) for which the channel's whole
      range fits. When new data widen the range, bins merge in pairs (``e`` grows),
      which loses nothing because coarse bins are unions of fine ones. The final bins
      depend only on the data's range, so the result is the same for any order or
      split of the data. ``-inf`` / ``+inf`` are counted in ``underflow`` /
      ``overflow``.

    NaN are counted separately (:meth:`nan_count`) in both kinds. Counts are int64.
    """

    version = 1

    def __init__(
        self,
        bins: int = 64,
        range: tuple[float, float] | None = None,
        edges: torch.Tensor | np.ndarray | Sequence[float] | None = None,
        min_width: float = 2.0**-20,
    ):
        if edges is None and range is not None:
            lo, hi = (float(v) for v in range)
            if not lo < hi:
                raise ValueError(f"Histogram range must be (lo, hi) with lo < hi, got {range}")
            edges = np.linspace(lo, hi, int(bins) + 1)
        if edges is not None:
            edges = torch.as_tensor(np.asarray(edges, dtype=np.float64))
            if edges.ndim not in (1, 2) or edges.shape[-1] < 2:
                raise ValueError(
                    f"Histogram edges must be [B+1] or [C, B+1] with B >= 1, got shape {tuple(edges.shape)}"
                )
            if not bool((edges[..., 1:] > edges[..., :-1]).all()) or not bool(
                edges.isfinite().all()
            ):
                raise ValueError("Histogram edges must be finite and strictly increasing")
            bins = edges.shape[-1] - 1
        if int(bins) < 1:
            raise ValueError(f"Histogram needs bins >= 1, got {bins}")
        if edges is None and int(bins) < 2:
            raise ValueError(
                f"Histogram with data-derived bins needs bins >= 2 (one aligned bin cannot "
                f"hold a range that crosses zero), got {bins}"
            )
        if not min_width > 0:
            raise ValueError(f"Histogram min_width must be positive, got {min_width}")
        self.bins = int(bins)
        self.mode = _ADAPTIVE if edges is None else _FIXED
        self.min_width = float(min_width)
        self._edges = edges
        self.channels: int | None = None if edges is None or edges.ndim == 1 else edges.shape[0]
        self.count = 0
        self._counts: torch.Tensor | None = None

    @property
    def device(self) -> torch.device | None:
        """The device the counts live on (``None`` before the first batch)."""
        return None if self._counts is None else self._counts.device

    @property
    def _e_min(self) -> int:
        return int(np.floor(np.log2(self.min_width)))

    def _init_state(self, channels: int, device: torch.device) -> None:
        self.channels = channels
        zeros = torch.zeros(channels, dtype=torch.int64, device=device)
        self._counts = torch.zeros(channels, self.bins, dtype=torch.int64, device=device)
        self._under, self._over, self._nan = zeros.clone(), zeros.clone(), zeros.clone()
        if self.mode == _FIXED:
            self._edges = self._edges.to(device)
            self._grid = self._edges.expand(channels, -1).contiguous()
        else:
            self._exp = torch.full((channels,), self._e_min, dtype=torch.int64, device=device)
            self._start = torch.zeros(channels, dtype=torch.float64, device=device)
            self._min = torch.full((channels,), float("inf"), dtype=torch.float64, device=device)
            self._max = torch.full((channels,), float("-inf"), dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor) -> None:
        """Add a batch ``x [N, C]``."""
        x = check_batch(x, self.channels, type(self).__name__)
        if self._counts is None:
            self._init_state(x.shape[1], x.device)
        elif self.device != x.device:
            self.to(x.device)
        self.count += x.shape[0]
        if x.shape[0] == 0:
            return
        x = x.double()
        self._nan += x.isnan().sum(0)
        if self.mode == _FIXED:
            self._update_fixed(x)
        else:
            self._update_adaptive(x)

    def _update_fixed(self, x: torch.Tensor) -> None:
        rows = x.T.contiguous()
        slot = torch.searchsorted(self._grid, rows, right=True)  # 0: under, 1..B: bins, B+1: over
        slot = torch.where(rows == self._grid[:, -1:], self.bins, slot)
        slot = torch.where(rows.isnan(), self.bins + 2, slot)
        width = self.bins + 3
        offsets = torch.arange(self.channels, device=x.device).unsqueeze(1) * width
        tally = torch.bincount((slot + offsets).flatten(), minlength=self.channels * width)
        tally = tally.view(self.channels, width)
        self._under += tally[:, 0]
        self._counts += tally[:, 1 : self.bins + 1]
        self._over += tally[:, self.bins + 1]

    def _update_adaptive(self, x: torch.Tensor) -> None:
        finite = x.isfinite()
        self._under += (x == float("-inf")).sum(0)
        self._over += (x == float("inf")).sum(0)
        lo = torch.where(finite, x, float("inf")).amin(0)
        hi = torch.where(finite, x, float("-inf")).amax(0)
        lo, hi = torch.minimum(self._min, lo), torch.maximum(self._max, hi)
        exp, start = _fit(lo, hi, self._exp, self.bins)
        self._counts = _rebin(
            self._counts, self._start, self._exp, start, exp, self._min <= self._max
        )
        self._exp, self._start, self._min, self._max = exp, start, lo, hi
        slot = torch.floor(torch.ldexp(x, -exp)) - start
        offsets = torch.arange(self.channels, device=x.device) * self.bins
        slot = (slot.long() + offsets)[finite]
        self._counts += torch.bincount(slot, minlength=self.channels * self.bins).view(
            self.channels, self.bins
        )

    def merge(self, other: Histogram) -> None:
        """Fold ``other`` (same kind of bins and channel count) into this one."""
        self._check_merge(other, "mode", "bins", "channels", "min_width")
        if self.mode == _FIXED and not _same_edges(self._edges, other._edges):
            raise ValueError(
                f"cannot merge Histogram with edges {_show_edges(other._edges)} into "
                f"Histogram with edges {_show_edges(self._edges)}"
            )
        if other._counts is None:
            self.count += other.count
            return
        if self._counts is None:
            self._init_state(other.channels, other.device)
        device = self.device
        if self.mode == _ADAPTIVE:
            lo = torch.minimum(self._min, other._min.to(device))
            hi = torch.maximum(self._max, other._max.to(device))
            exp, start = _fit(lo, hi, torch.maximum(self._exp, other._exp.to(device)), self.bins)
            mine = _rebin(self._counts, self._start, self._exp, start, exp, self._min <= self._max)
            theirs = _rebin(
                other._counts.to(device),
                other._start.to(device),
                other._exp.to(device),
                start,
                exp,
                other._min.to(device) <= other._max.to(device),
            )
            self._counts = mine + theirs
            self._exp, self._start, self._min, self._max = exp, start, lo, hi
        else:
            self._counts += other._counts.to(device)
        self._under += other._under.to(device)
        self._over += other._over.to(device)
        self._nan += other._nan.to(device)
        self.count += other.count

    def _require(self) -> None:
        if self._counts is None:
            raise ValueError("Histogram has seen no data yet")

    def counts(self) -> torch.Tensor:
        """``[C, B]`` int64 counts per bin."""
        self._require()
        return self._counts.clone()

    def edges(self) -> torch.Tensor:
        """``[C, B+1]`` float64 bin edges (NaN for a data-derived channel with no data)."""
        self._require()
        if self.mode == _FIXED:
            return self._grid.clone()
        grid = self._start.unsqueeze(1) + torch.arange(self.bins + 1, device=self.device)
        edges = torch.ldexp(grid, self._exp.unsqueeze(1))
        return torch.where((self._min <= self._max).unsqueeze(1), edges, float("nan"))

    def underflow(self) -> torch.Tensor:
        """``[C]`` values below the first edge (``-inf`` for data-derived bins)."""
        self._require()
        return self._under.clone()

    def overflow(self) -> torch.Tensor:
        """``[C]`` values above the last edge (``+inf`` for data-derived bins)."""
        self._require()
        return self._over.clone()

    def nan_count(self) -> torch.Tensor:
        """``[C]`` NaN values seen."""
        self._require()
        return self._nan.clone()

    def to_xarray(self, units: Sequence | None = None) -> xr.Dataset:
        """``counts`` (``unit``, ``bin``), ``edges`` (``unit``, ``edge``), and
        ``underflow``, ``overflow``, ``nan`` (``unit``)."""
        self._require()
        return xr.Dataset(
            {
                "counts": (("unit", "bin"), to_numpy(self._counts)),
                "edges": (("unit", "edge"), to_numpy(self.edges())),
                "underflow": ("unit", to_numpy(self._under)),
                "overflow": ("unit", to_numpy(self._over)),
                "nan": ("unit", to_numpy(self._nan)),
            },
            coords=xr_units(units, self.channels),
            attrs={"count": self.count, "mode": self.mode},
        )

    _ADAPTIVE_STATE = ("exp", "start", "min", "max")

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state: settings, counts, and edges (fixed) or exponent, start,
        min and max per channel (data-derived)."""
        sd: dict[str, Any] = {
            **self._header(),
            "mode": self.mode,
            "bins": self.bins,
            "min_width": self.min_width,
            "count": int(self.count),
            "channels": -1 if self.channels is None else int(self.channels),
        }
        if self.mode == _FIXED:
            sd["edges"] = to_numpy(self._edges)
        if self._counts is None:
            return sd
        sd.update(counts=to_numpy(self._counts), underflow=to_numpy(self._under))
        sd.update(overflow=to_numpy(self._over), nan=to_numpy(self._nan))
        if self.mode == _ADAPTIVE:
            sd.update({name: to_numpy(getattr(self, "_" + name)) for name in self._ADAPTIVE_STATE})
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`."""
        self._check_header(sd)
        mode = str(np.asarray(sd["mode"]))
        Histogram.__init__(
            self,
            bins=int(np.asarray(sd["bins"])),
            edges=np.asarray(sd["edges"]) if mode == _FIXED else None,
            min_width=float(np.asarray(sd["min_width"])),
        )
        self.count = int(np.asarray(sd["count"]))
        channels = int(np.asarray(sd["channels"]))
        if "counts" not in sd:
            self.channels = None if channels < 0 else channels
            return
        self._init_state(channels, torch.device("cpu"))
        for name in ("counts", "underflow", "overflow", "nan"):
            attr = {"underflow": "_under", "overflow": "_over"}.get(name, "_" + name)
            setattr(self, attr, as_tensor(sd[name]))
        if mode == _ADAPTIVE:
            for name in self._ADAPTIVE_STATE:
                setattr(self, "_" + name, as_tensor(sd[name]))

    def to(self, device: torch.device | str) -> Histogram:
        """Move the state to ``device``."""
        for name in (
            "_counts",
            "_under",
            "_over",
            "_nan",
            "_edges",
            "_exp",
            "_start",
            "_min",
            "_max",
        ):
            value = getattr(self, name, None)
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self

    def __repr__(self) -> str:
        return f"Histogram(bins={self.bins}, mode={self.mode!r}, channels={self.channels}, count={self.count})"


def _same_edges(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.cpu(), b.cpu()
    if a.shape[-1] != b.shape[-1]:
        return False
    try:
        a, b = torch.broadcast_tensors(a, b)
    except RuntimeError:
        return False
    return bool(torch.equal(a, b))


def _show_edges(e: torch.Tensor) -> str:
    return f"{tuple(e.shape)} from {e.min().item():g} to {e.max().item():g}"


def _fit(
    lo: torch.Tensor, hi: torch.Tensor, exp: torch.Tensor, bins: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest exponents ``>= exp`` such that ``[lo, hi]`` spans fewer than ``bins`` grid
    cells of width ``2**e``, and the index of the first cell. Empty channels keep ``exp``."""
    has = lo <= hi
    span = torch.where(has, hi - lo, 0.0)
    bound = torch.floor(torch.log2(span / bins)).nan_to_num(nan=0.0, neginf=-(2**20), posinf=2**20)
    exp = torch.maximum(exp, bound.long())
    lo_, hi_ = torch.where(has, lo, 0.0), torch.where(has, hi, 0.0)
    while True:
        first = torch.floor(torch.ldexp(lo_, -exp))
        wide = torch.floor(torch.ldexp(hi_, -exp)) - first >= bins
        if not bool(wide.any()):
            return exp, first
        exp = exp + wide.long()


def _rebin(
    counts: torch.Tensor,
    start: torch.Tensor,
    exp: torch.Tensor,
    new_start: torch.Tensor,
    new_exp: torch.Tensor,
    has: torch.Tensor,
) -> torch.Tensor:
    """Move ``[C, B]`` counts on grid ``(start, exp)`` to the coarser grid ``(new_start, new_exp)``."""
    bins = counts.shape[1]
    cells = torch.where(has, start, new_start).unsqueeze(1) + torch.arange(
        bins, device=counts.device
    )
    coarse = torch.floor(torch.ldexp(cells, (exp - new_exp).unsqueeze(1))) - new_start.unsqueeze(1)
    coarse = torch.where(has.unsqueeze(1), coarse, 0.0).clamp(0, bins - 1).long()  # empty cells
    return torch.zeros_like(counts).scatter_add_(1, coarse, counts)


class Bincount(Stat):
    """Per-channel counts of non-negative integers in ``[N, C]`` data: ``[C, L]`` int64.

    ``L`` grows to the largest value seen plus one (at least ``minlength``). Exact
    and exactly mergeable.
    """

    version = 1

    def __init__(self, minlength: int = 0):
        if int(minlength) < 0:
            raise ValueError(f"Bincount minlength must be >= 0, got {minlength}")
        self.minlength = int(minlength)
        self.channels: int | None = None
        self.count = 0
        self._counts: torch.Tensor | None = None

    @property
    def device(self) -> torch.device | None:
        """The device the counts live on (``None`` before the first batch)."""
        return None if self._counts is None else self._counts.device

    def update(self, x: torch.Tensor) -> None:
        """Add a batch ``x [N, C]`` of non-negative integers (or bools)."""
        x = check_batch(x, self.channels, type(self).__name__)
        if x.is_floating_point() or x.is_complex():
            raise ValueError(f"Bincount.update expects integer values, got {x.dtype}")
        if self._counts is None:
            self.channels = x.shape[1]
            self._counts = torch.zeros(
                x.shape[1], self.minlength, dtype=torch.int64, device=x.device
            )
        elif self.device != x.device:
            self.to(x.device)
        self.count += x.shape[0]
        if x.shape[0] == 0:
            return
        x = x.long()
        low = int(x.min())
        if low < 0:
            raise ValueError(f"Bincount.update expects non-negative integers, got minimum {low}")
        self._grow(int(x.max()) + 1)
        length = self._counts.shape[1]
        flat = (x + torch.arange(self.channels, device=x.device) * length).flatten()
        self._counts += torch.bincount(flat, minlength=self.channels * length).view(
            self.channels, length
        )

    def _grow(self, length: int) -> None:
        if length > self._counts.shape[1]:
            pad = length - self._counts.shape[1]
            self._counts = torch.nn.functional.pad(self._counts, (0, pad))

    def merge(self, other: Bincount) -> None:
        """Fold ``other`` (same channel count) into this one."""
        self._check_merge(other, "channels")
        self.count += other.count
        if other._counts is None:
            return
        if self._counts is None:
            self.channels = other.channels
            self._counts = other._counts.clone()
            return
        self._grow(other._counts.shape[1])
        theirs = other._counts.to(self.device)
        self._counts[:, : theirs.shape[1]] += theirs

    def counts(self) -> torch.Tensor:
        """``[C, L]`` int64: how often each channel took each value."""
        if self._counts is None:
            raise ValueError("Bincount has seen no data yet")
        return self._counts.clone()

    def to_xarray(self, units: Sequence | None = None) -> xr.Dataset:
        """``counts`` over dims ``(unit, value)``."""
        counts = self.counts()
        return xr.Dataset(
            {"counts": (("unit", "value"), to_numpy(counts))},
            coords={**xr_units(units, counts.shape[0]), "value": np.arange(counts.shape[1])},
            attrs={"count": self.count},
        )

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state: ``minlength``, ``count``, ``counts [C, L]``."""
        empty = self._counts is None
        return {
            **self._header(),
            "minlength": self.minlength,
            "count": int(self.count),
            "channels": -1 if empty else int(self.channels),
            "counts": np.zeros((0, 0), np.int64) if empty else to_numpy(self._counts),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`."""
        self._check_header(sd)
        Bincount.__init__(self, int(np.asarray(sd["minlength"])))
        self.count = int(np.asarray(sd["count"]))
        channels = int(np.asarray(sd["channels"]))
        if channels >= 0:
            self.channels = channels
            self._counts = as_tensor(sd["counts"]).long().reshape(channels, -1)

    def to(self, device: torch.device | str) -> Bincount:
        """Move the counts to ``device``."""
        if self._counts is not None:
            self._counts = self._counts.to(device)
        return self

    def __repr__(self) -> str:
        return f"Bincount(channels={self.channels}, count={self.count})"
