"""Per-channel top-k values with the sample indices they came from (unit galleries)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr

from nethook.stats.base import Stat, as_tensor, check_batch, to_numpy, xr_units


class TopK(Stat):
    """The ``k`` largest (or smallest) values of every channel of ``[N, C]`` data.

    Each value comes with the index of the sample (row) it came from: by default the
    running row count (``0, 1, 2, ...`` across updates); pass ``index`` to
    :meth:`update` as an offset (the first row's index) or as one index per row, e.g.
    image numbers when ``x`` holds each image's peak activation. Ties are broken
    toward the smaller sample index, so the result is exact and deterministic: merging
    any split of the data (with their true indices) equals one pass. A NaN counts as
    the worst possible value (``-inf``, or ``+inf`` with ``largest=False``) and is
    reported as that value.
    """

    version = 1

    def __init__(self, k: int, largest: bool = True):
        if int(k) < 1:
            raise ValueError(f"TopK needs k >= 1, got k={k}")
        self.k = int(k)
        self.largest = bool(largest)
        self.channels: int | None = None
        self.count = 0
        self._scores: torch.Tensor | None = None
        self._indices: torch.Tensor | None = None

    @property
    def device(self) -> torch.device | None:
        """The device the state lives on (``None`` before the first batch)."""
        return None if self._scores is None else self._scores.device

    def update(self, x: torch.Tensor, index: int | torch.Tensor | None = None) -> None:
        """Add a batch ``x [N, C]``; ``index`` is a first-row offset or ``[N]`` sample indices."""
        x = check_batch(x, self.channels, type(self).__name__)
        n = x.shape[0]
        rows = self._row_indices(index, n, x.device)
        if self._scores is None:
            self.channels = x.shape[1]
            self._scores = x.new_empty((x.shape[1], 0))
            self._indices = torch.empty((x.shape[1], 0), dtype=torch.int64, device=x.device)
        elif self.device != x.device:
            self.to(x.device)
        self.count += n
        if n == 0:
            return
        scores = x if self.largest else -x
        scores = torch.where(scores.isnan(), float("-inf"), scores)
        if index is not None and n > 1 and bool((rows[1:] < rows[:-1]).any()):
            order = rows.argsort(stable=True)
            rows, scores = rows[order], scores[order]
        cand_scores, cand_rows = _batch_top(scores, min(self.k, n))
        self._scores, self._indices = _best(
            self._scores, self._indices, cand_scores.T, rows[cand_rows].T, self.k
        )

    def _row_indices(self, index, n: int, device: torch.device) -> torch.Tensor:
        if index is None:
            index = self.count
        if isinstance(index, int | np.integer):
            return torch.arange(int(index), int(index) + n, device=device)
        rows = torch.as_tensor(index, device=device)
        if rows.shape != (n,) or rows.is_floating_point():
            raise ValueError(
                f"TopK.update index must be an int offset or {n} integer indices (one per "
                f"row), got {rows.dtype} of shape {tuple(rows.shape)}"
            )
        return rows.long()

    def merge(self, other: TopK) -> None:
        """Fold ``other`` (same ``k``, direction and channels) into this one."""
        self._check_merge(other, "k", "largest", "channels")
        if other._scores is None:
            return
        if self._scores is None:
            self.load_state_dict(other.state_dict())
            self.to(other.device)
            return
        device = self.device
        self._scores, self._indices = _best(
            self._scores,
            self._indices,
            other._scores.to(device),
            other._indices.to(device),
            self.k,
        )
        self.count += other.count

    def _require(self) -> None:
        if self._scores is None:
            raise ValueError("TopK has seen no data yet")

    def values(self) -> torch.Tensor:
        """``[C, m]`` best values per channel, best first (``m = min(k, count)``)."""
        self._require()
        return self._scores.clone() if self.largest else -self._scores

    def indices(self) -> torch.Tensor:
        """``[C, m]`` int64 sample index of each of :meth:`values`."""
        self._require()
        return self._indices.clone()

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, indices)``, each ``[C, m]``."""
        return self.values(), self.indices()

    def to_xarray(self, units: Sequence | None = None) -> xr.Dataset:
        """``value`` and ``index`` over dims ``(unit, rank)``; attrs ``k``, ``count``."""
        values, indices = self.result()
        coords = {**xr_units(units, values.shape[0]), "rank": np.arange(values.shape[1])}
        return xr.Dataset(
            {
                "value": (("unit", "rank"), to_numpy(values)),
                "index": (("unit", "rank"), to_numpy(indices)),
            },
            coords=coords,
            attrs={"k": self.k, "largest": int(self.largest), "count": self.count},
        )

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state: ``k``, ``largest``, ``count``, ``values`` and ``indices`` ``[C, m]``."""
        empty = self._scores is None
        return {
            **self._header(),
            "k": self.k,
            "largest": self.largest,
            "count": int(self.count),
            "channels": -1 if empty else int(self.channels),
            "values": np.zeros((0, 0), np.float32) if empty else to_numpy(self.values()),
            "indices": np.zeros((0, 0), np.int64) if empty else to_numpy(self._indices),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`."""
        self._check_header(sd)
        device = self.device if hasattr(self, "_scores") else None
        TopK.__init__(self, int(np.asarray(sd["k"])), bool(np.asarray(sd["largest"])))
        self.count = int(np.asarray(sd["count"]))
        channels = int(np.asarray(sd["channels"]))
        if channels < 0:
            return
        self.channels = channels
        values = as_tensor(sd["values"], device).reshape(channels, -1)
        self._scores = values if self.largest else -values
        self._indices = as_tensor(sd["indices"], device).long().reshape(channels, -1)

    def to(self, device: torch.device | str) -> TopK:
        """Move the state to ``device``."""
        if self._scores is not None:
            self._scores = self._scores.to(device)
            self._indices = self._indices.to(device)
        return self

    def __repr__(self) -> str:
        return f"TopK(k={self.k}, largest={self.largest}, channels={self.channels}, count={self.count})"


def _batch_top(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` rows per column of ``scores [N, C]`` (rows in index order), ties to earlier rows.

    ``torch.topk`` picks among values tied at the k-th place arbitrarily; columns where
    such a tie straddles the cut are redone exactly (take every value above the cut,
    then the earliest rows equal to it).
    """
    top, rows = scores.topk(k, dim=0)
    cut = top[-1]
    ambiguous = (scores == cut).sum(0) > (top == cut).sum(0)
    if bool(ambiguous.any()):
        sub, sub_cut = scores[:, ambiguous], cut[ambiguous]
        above, tied = sub > sub_cut, sub == sub_cut
        wanted = k - above.sum(0)
        take = above | (tied & (tied.cumsum(0) <= wanted))
        rows[:, ambiguous] = take.T.nonzero()[:, 1].view(-1, k).T
        top = scores.gather(0, rows)
    return top, rows


def _best(
    scores_a: torch.Tensor,
    index_a: torch.Tensor,
    scores_b: torch.Tensor,
    index_b: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``k`` of two ``[C, *]`` candidate sets, ordered by (score desc, index asc)."""
    dtype = torch.promote_types(scores_a.dtype, scores_b.dtype)
    scores = torch.cat([scores_a.to(dtype), scores_b.to(dtype)], dim=1)
    index = torch.cat([index_a, index_b], dim=1)
    order = index.argsort(dim=1, stable=True)
    scores, index = scores.gather(1, order), index.gather(1, order)
    order = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, order), index.gather(1, order)
