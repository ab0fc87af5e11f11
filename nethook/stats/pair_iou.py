"""IoU tallies with a threshold per (unit, concept) pair (GAN dissection).

:class:`PairIoU` counts, over a stream of pixels, how well each unit's binary mask
matches each concept when unit ``u``'s mask *for concept* ``k`` is
``activation > thresholds[u, k]`` (GAN Dissection picks the threshold per pair;
network dissection's :class:`~nethook.stats.iou.IoU` takes one per unit):

- ``intersection[u, k]``: pixels where the mask is on and concept ``k`` present;
- ``unit_area[u, k]``: pixels where the mask is on;
- ``label_area[k]``: pixels where concept ``k`` is present.

``IoU[u, k] = I / (unit_area + label_area - I)``. All tallies are exact int64 counts,
so merging any split of the data equals one pass.

How a batch of ``N`` pixels is tallied, vectorized over units (no loop over them):

- ``unit_area``: each unit's activations are sorted once; the count above each of
  its ``K`` thresholds is then a batched binary search (``N log N`` per unit, not
  ``N K``);
- ``intersection``: only (pixel, concept) pairs where the concept is present are
  visited; each pair compares the pixel's ``U`` activations with the concept's
  ``U`` thresholds and the results are summed per concept.

On CPU the sorting and the per-concept counts run in numpy (several times faster
than torch's CPU kernels here, as for :mod:`nethook.stats.quantile`) and the
copies and gathers in torch (multi-threaded); tensors on other devices stay in
torch throughout. Both paths give identical counts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr

from nethook.stats.base import Stat, as_tensor, check_batch, to_numpy, xr_units

NUMPY_ON_CPU = True  # tests set this False to run the torch (accelerator) path on CPU
_CHUNK_ELEMENTS = 1 << 22  # (pair, unit) comparisons per block: bounds temporary memory

__all__ = ["PairIoU", "present_pairs"]


class PairIoU(Stat):
    """Exact IoU tallies of ``U`` units against ``K`` concepts, one threshold per pair.

    Args:
        thresholds: ``[U, K]`` real thresholds (unit, concept); the mask of unit ``u``
            for concept ``k`` is ``activation > thresholds[u, k]`` (``+inf``: never
            on). Kept in their dtype; activations are compared in the promoted dtype.
        concepts: optional labels of the ``K`` concepts (ints or strings), the
            ``concept`` coordinate of :meth:`to_xarray`. Integer labels are concept
            ids, which lets :meth:`update` take per-pixel id maps.

    The tallies live on the device of the last batch (``to`` moves them).
    """

    version = 1

    def __init__(self, thresholds: Any, concepts: Sequence[int | str] | None = None) -> None:
        thr = thresholds if isinstance(thresholds, torch.Tensor) else as_tensor(thresholds)
        thr = thr.detach()
        if thr.ndim != 2:
            raise ValueError(
                f"PairIoU thresholds must be [units, concepts], got shape {tuple(thr.shape)}"
            )
        if not thr.is_floating_point():
            thr = thr.double()
        if bool(thr.isnan().any()):
            raise ValueError("PairIoU thresholds must not be NaN (use +inf for 'never on')")
        units, k = thr.shape
        if concepts is not None:
            concepts = [c if isinstance(c, str) else int(c) for c in concepts]
            if len(concepts) != k:
                raise ValueError(
                    f"PairIoU got {len(concepts)} concept labels for {k} threshold columns"
                )
        self.thresholds = thr.clone()
        self.concepts = concepts
        self.count = 0
        device = thr.device
        self.intersection = torch.zeros(units, k, dtype=torch.int64, device=device)
        self.unit_area = torch.zeros(units, k, dtype=torch.int64, device=device)
        self.label_area = torch.zeros(k, dtype=torch.int64, device=device)

    @property
    def num_units(self) -> int:
        """``U``, the number of units (threshold rows)."""
        return self.thresholds.shape[0]

    @property
    def num_concepts(self) -> int:
        """``K``, the number of concepts (threshold columns)."""
        return self.thresholds.shape[1]

    @property
    def device(self) -> torch.device:
        """The device holding the tallies."""
        return self.intersection.device

    # ---------------------------------------------------------------- update

    def update(self, acts: torch.Tensor, presence: torch.Tensor) -> None:
        """Add ``N`` pixels: activations ``acts [N, U]`` and which concepts each carries.

        ``presence`` is either a boolean ``[N, K]`` matrix (column ``k``: concept
        ``k`` present) or integer concept ids ``[N, L]`` (``L`` label layers per
        pixel, e.g. object, part, material), matched against integer ``concepts``;
        ids not among them (such as 0, "no label") are ignored, and an id repeated
        at a pixel counts once.
        """
        acts = check_batch(acts, self.num_units, type(self).__name__).detach()
        presence = self._check_presence(presence, acts.shape[0], acts.device)
        table = (
            None
            if presence.dtype == torch.bool
            else _id_table(self.concepts, f"{type(self).__name__}.update")
        )
        if self.device != acts.device:
            self.to(acts.device)
        dtype = torch.promote_types(acts.dtype, self.thresholds.dtype)
        acts = acts.to(dtype)
        thr = self.thresholds.to(dtype)
        if _numpy_on(acts.device):
            table = None if table is None else table.numpy()
            counts = _tally_numpy(acts, thr.numpy(), presence.numpy(), table)
            counts = [torch.from_numpy(c) for c in counts]
        else:
            counts = _tally_torch(
                acts, thr, presence, None if table is None else table.to(acts.device)
            )
        above, inter, label = counts
        self.unit_area += above
        self.intersection += inter
        self.label_area += label
        self.count += acts.shape[0]

    def _check_presence(self, presence: Any, n: int, device: torch.device) -> torch.Tensor:
        """``presence`` as a tensor on ``device``, or an error naming what was expected."""
        presence = torch.as_tensor(presence, device=device).detach()
        name = type(self).__name__
        if presence.ndim != 2 or presence.shape[0] != n:
            raise ValueError(
                f"{name}.update presence must be [N, K] boolean or [N, L] concept ids "
                f"with N = {n} rows like the activations, got shape {tuple(presence.shape)}"
            )
        if presence.dtype == torch.bool:
            if presence.shape[1] != self.num_concepts:
                raise ValueError(
                    f"{name}.update presence has {presence.shape[1]} columns; expected one "
                    f"per concept ({self.num_concepts})"
                )
        elif presence.is_floating_point() or presence.is_complex():
            raise ValueError(
                f"{name}.update presence must be boolean or integer ids, got {presence.dtype}"
            )
        return presence

    # ---------------------------------------------------------------- results

    def iou(self) -> torch.Tensor:
        """``[U, K]`` float64 IoU (0 where the union is empty)."""
        inter = self.intersection.double()
        union = self.unit_area.double() + self.label_area.double()[None, :] - inter
        return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union))

    def to_xarray(self, units: Sequence | None = None) -> xr.Dataset:
        """``iou``, ``intersection``, ``unit_area``, ``threshold`` over ``(unit, concept)``
        and ``label_area`` over ``concept``; attr ``count`` (pixels seen)."""
        labels = self.concepts if self.concepts is not None else range(self.num_concepts)
        coords = {**xr_units(units, self.num_units), "concept": list(labels)}
        pair = ("unit", "concept")
        return xr.Dataset(
            {
                "iou": (pair, to_numpy(self.iou())),
                "intersection": (pair, to_numpy(self.intersection)),
                "unit_area": (pair, to_numpy(self.unit_area)),
                "label_area": ("concept", to_numpy(self.label_area)),
                "threshold": (pair, to_numpy(self.thresholds)),
            },
            coords=coords,
            attrs={"count": self.count},
        )

    # ---------------------------------------------------------------- protocol

    def merge(self, other: PairIoU) -> None:
        """Add ``other``'s tallies (same thresholds and concepts) into this one."""
        self._check_merge(other, "thresholds", "concepts")
        device = self.device
        self.intersection += other.intersection.to(device)
        self.unit_area += other.unit_area.to(device)
        self.label_area += other.label_area.to(device)
        self.count += other.count

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state: thresholds, concept labels (JSON), the three tallies, count."""
        return {
            **self._header(),
            "thresholds": to_numpy(self.thresholds),
            "concepts": json.dumps(self.concepts),
            "intersection": to_numpy(self.intersection),
            "unit_area": to_numpy(self.unit_area),
            "label_area": to_numpy(self.label_area),
            "count": int(self.count),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (onto the current device, if any)."""
        self._check_header(sd)
        device = self.device if hasattr(self, "intersection") else None
        concepts = json.loads(str(np.asarray(sd["concepts"])))
        PairIoU.__init__(self, as_tensor(sd["thresholds"]), concepts)
        expected = {
            "intersection": self.intersection.shape,
            "unit_area": self.unit_area.shape,
            "label_area": self.label_area.shape,
        }
        for name, shape in expected.items():
            value = as_tensor(sd[name]).long()
            if value.shape != shape:
                raise ValueError(
                    f"PairIoU state {name} has shape {tuple(value.shape)}, expected {tuple(shape)}"
                )
            setattr(self, name, value)
        self.count = int(np.asarray(sd["count"]))
        if device is not None:
            self.to(device)

    def to(self, device: torch.device | str) -> PairIoU:
        """Move thresholds and tallies to ``device``."""
        for name in ("thresholds", "intersection", "unit_area", "label_area"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def __repr__(self) -> str:
        return f"PairIoU(units={self.num_units}, concepts={self.num_concepts}, count={self.count})"


def _numpy_on(device: torch.device) -> bool:
    return device.type == "cpu" and NUMPY_ON_CPU


def present_pairs(
    presence: torch.Tensor, concepts: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)``: the (pixel, concept column) pairs where a concept is present,
    sorted by column then pixel, each pair once.

    ``presence`` is a boolean ``[N, K]`` matrix, or integer concept ids ``[N, L]``
    with ``concepts`` the ids of the ``K`` columns (other ids are ignored).
    """
    table = None if presence.dtype == torch.bool else _id_table(concepts, "present_pairs")
    if _numpy_on(presence.device):
        table = None if table is None else table.numpy()
        rows, cols = _pairs_numpy(presence.numpy(), table)
        return torch.from_numpy(rows), torch.from_numpy(cols)
    return _pairs_torch(presence, None if table is None else table.to(presence.device))


def _id_table(concepts: Sequence[int | str] | None, name: str) -> torch.Tensor:
    """Column of each concept id (-1: not among ``concepts``)."""
    if concepts is None or not all(isinstance(c, int | np.integer) for c in concepts):
        raise ValueError(
            f"{name} got integer concept ids, which needs integer `concepts` (the ids "
            "of the threshold columns); pass a boolean [N, K] presence matrix instead"
        )
    ids = torch.as_tensor([int(c) for c in concepts], dtype=torch.long)
    if len(ids) and int(ids.min()) < 0:
        raise ValueError(f"{name}: concept ids must be >= 0 to match id maps")
    table = torch.full((int(ids.max()) + 1 if len(ids) else 1,), -1, dtype=torch.long)
    table[ids] = torch.arange(len(ids))
    return table


def _pairs_torch(
    presence: torch.Tensor, table: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)`` of the (pixel, concept) pairs where a concept is present, sorted
    by concept, each pair once. ``table`` maps concept ids to columns (id maps only)."""
    n = presence.shape[0]
    if table is None:
        cols, rows = presence.T.nonzero().unbind(1)
        return rows, cols
    ids = presence.long()
    known = (ids >= 0) & (ids < len(table))
    cols = table.index_select(0, ids.clamp(0, len(table) - 1).flatten()).view_as(ids)
    cols = torch.where(known, cols, -1)
    rows = torch.arange(n, device=ids.device)[:, None].expand_as(ids)
    keep = cols >= 0
    key = torch.unique(cols[keep] * n + rows[keep])
    return key % n, key // n


def _pairs_numpy(presence: np.ndarray, table: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_pairs_torch` in numpy."""
    n = presence.shape[0]
    if table is None:
        cols, rows = np.nonzero(presence.T)
        return rows, cols
    ids = presence.astype(np.int64, copy=False)
    known = (ids >= 0) & (ids < len(table))
    cols = np.where(known, table[np.where(known, ids, 0)], -1)
    rows = np.broadcast_to(np.arange(n)[:, None], ids.shape)
    keep = cols >= 0
    key = np.sort(cols[keep] * n + rows[keep])
    key = key[np.r_[True, key[1:] != key[:-1]]] if len(key) else key
    return key % n, key // n


def _tally_torch(
    acts: torch.Tensor, thr: torch.Tensor, presence: torch.Tensor, table: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(unit_area, intersection, label_area)`` increments of one batch, in torch."""
    n, units = acts.shape
    k = thr.shape[1]
    rows, cols = _pairs_torch(presence, table)
    clean = torch.where(acts.isnan(), float("-inf"), acts)  # NaN is never above a threshold
    ordered = clean.T.contiguous().sort(dim=1).values
    above = n - torch.searchsorted(ordered, thr.contiguous(), right=True)
    inter = torch.zeros(k, units, dtype=torch.int64, device=acts.device)
    thr_t = thr.T.contiguous()
    step = max(1, _CHUNK_ELEMENTS // max(units, 1))
    for start in range(0, len(rows), step):
        r, c = rows[start : start + step], cols[start : start + step]
        on = acts.index_select(0, r) > thr_t.index_select(0, c)
        inter.index_add_(0, c, on.long())
    return above, inter.T.contiguous(), torch.bincount(cols, minlength=k)


def _tally_numpy(
    acts: torch.Tensor, thr: np.ndarray, presence: np.ndarray, table: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_tally_torch` for CPU tensors: numpy sorts and counts (several times
    faster than torch's CPU kernels), torch copies and gathers (multi-threaded). The
    pairs come sorted by concept, so each concept's gathered rows form one block,
    compared with that concept's ``U`` thresholds at once (a loop over the concepts
    present, not over units)."""
    n, units = acts.shape
    k = thr.shape[1]
    rows, cols = _pairs_numpy(presence, table)
    acts_t = acts.T.contiguous().numpy()
    clean = np.where(np.isnan(acts_t), -np.inf, acts_t) if np.isnan(acts_t).any() else acts_t
    ordered = torch.from_numpy(np.sort(clean, axis=1))
    above = n - torch.searchsorted(ordered, torch.from_numpy(np.ascontiguousarray(thr)), right=True)
    inter = np.zeros((k, units), dtype=np.int64)
    thr_t = np.ascontiguousarray(thr.T)
    step = max(1, _CHUNK_ELEMENTS // max(units, 1))
    for start in range(0, len(rows), step):
        r, c = rows[start : start + step], cols[start : start + step]
        block = acts.index_select(0, torch.from_numpy(r)).numpy()  # [pairs, U]
        counts = np.bincount(c, minlength=k)
        ends = np.cumsum(counts)
        for j in np.flatnonzero(counts).tolist():
            run = block[ends[j] - counts[j] : ends[j]]
            inter[j] += np.count_nonzero(run > thr_t[j], axis=0)
    return above.numpy(), inter.T.copy(), np.bincount(cols, minlength=k).astype(np.int64)
