"""Intersection-over-union tallies between unit masks and concept labels (dissection).

:class:`IoU` accumulates, over a stream of images, what Network Dissection needs to
score every unit against every concept (``shared/METHODS.md`` §1):

- ``intersection[u, c]``: pixels where unit ``u``'s binary mask is on and concept
  ``c`` is labelled;
- ``label_area[c]``: pixels labelled ``c``;
- ``unit_area[u, k]``: pixels where unit ``u`` is on, summed only over images that
  carry any label of category ``k`` (the category conditioning: images without any
  label of a concept's category do not count towards that concept's union).

Then ``IoU[u, c] = I / (unit_area[u, category(c)] + label_area[c] - I)``.

Concept ids are global integers, ``0`` meaning "no label". The ``[U, concepts, H,
W]`` product is never formed; a block of masks is tallied one of two ways, with
identical results:

- sparse: the flat indices of the mask's on entries give (image, unit, pixel);
  the pixel's labels give (unit, concept) keys, counted by bincounts. Cost:
  one pass over the mask plus work per on entry, so it suits thresholded
  dissection masks (0.5% on). :meth:`IoU.update_flat` and :meth:`IoU.update_on`
  take the on entries themselves, found without any dense mask.
- GEMM: per image ``mask[U, P] @ onehot[P, c_i + 1]``, where the ``c_i`` columns
  are only the concepts present in that image, plus a column of ones that yields
  the unit's area: ``U * P * (c_i + 1)`` multiply-adds, not ``U * P * concepts``,
  whatever the density. It runs in float32 on 0/1 operands, so every sum is an
  exact integer (at most one image's pixel count, kept below 2**24; larger
  images switch to float64).

Tallies are int64.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr

from nethook.stats.base import Stat, to_numpy, xr_units

_EXACT_FLOAT32 = 2**24
TensorLike = torch.Tensor | np.ndarray


class IoU(Stat):
    """Category-conditioned IoU tallies of ``U`` units against global concept ids.

    Args:
        num_units: number of units ``U`` (channel count of the masks).
        concept_category: either an int array indexed by concept id (length = number
            of ids, entry 0 ignored) giving each concept's category index, with a
            negative entry for ids that are not concepts; or a concepts table
            (``pandas.DataFrame`` with columns ``id``, ``category`` and optionally
            ``name``, as ``ConceptSource.concepts()`` returns).
        categories: category names in category-index order. With a DataFrame this
            fixes the order (default: order of first appearance); with an array it
            names the indices (default ``"0"``, ``"1"``, ...).
        concept_names: names indexed by concept id (taken from the DataFrame when
            given one), used as a coordinate of the xarray results.
        chunk_bytes: memory bound for the float mask block of one GEMM (per worker
            thread); batches of any size are processed in chunks of images (and of
            pixels, when one image alone exceeds it).
        method: how a block of masks is tallied: ``"sparse"`` (indices of the on
            pixels, then one bincount; cost grows with the mask's density),
            ``"gemm"`` (compact one-hot GEMM; cost independent of density), or
            ``"auto"`` (GEMM on accelerators; on CPU sparse for blocks at most 5%
            on, as thresholded dissection masks are, GEMM otherwise). All give
            identical tallies.

    Each update computes on the device of ``masks``; the (small) tallies move
    there too. On CPU, ranges of images are tallied in parallel threads, one per
    torch thread. Readouts are torch tensors on the stat's device.
    """

    version = 1

    def __init__(
        self,
        num_units: int,
        concept_category: TensorLike | Sequence[int] | pd.DataFrame,
        *,
        categories: Sequence[str] | None = None,
        concept_names: Sequence[str] | None = None,
        chunk_bytes: int = 64 << 20,
        method: str = "auto",
    ) -> None:
        if int(num_units) != num_units or num_units < 1:
            raise ValueError(f"IoU num_units must be a positive int, got {num_units!r}")
        if isinstance(concept_category, pd.DataFrame):
            table, cats, names = _from_concepts_table(concept_category, categories)
        else:
            table, cats = _from_category_array(concept_category, categories)
            names = None
        if concept_names is not None:
            names = [str(n) for n in concept_names]
            if len(names) != len(table):
                raise ValueError(
                    f"IoU concept_names must have one name per concept id ({len(table)}), "
                    f"got {len(names)}"
                )
        if chunk_bytes < 1:
            raise ValueError(f"IoU chunk_bytes must be positive, got {chunk_bytes}")
        if method not in _METHODS:
            raise ValueError(f"IoU method must be one of {_METHODS}, got {method!r}")
        self.num_units = int(num_units)
        self.concept_category = table
        self.categories = cats
        self.concept_names = names
        self.chunk_bytes = int(chunk_bytes)
        self.method = method
        self._device = torch.device("cpu")
        self._zero_tallies()

    # ------------------------------------------------------------------ shapes
    @property
    def num_concepts(self) -> int:
        """Length of the concept-id axis (largest id + 1, including id 0 = none)."""
        return len(self.concept_category)

    @property
    def num_categories(self) -> int:
        """Number of categories ``K``."""
        return len(self.categories)

    @property
    def device(self) -> torch.device:
        """Device holding the tallies."""
        return self._device

    @property
    def image_count(self) -> int:
        """Images seen so far."""
        return int(self._images)

    def _zero_tallies(self) -> None:
        u, c, k, dev = self.num_units, self.num_concepts, self.num_categories, self._device
        self._intersection = torch.zeros(u, c, dtype=torch.int64, device=dev)
        self._label_area = torch.zeros(c, dtype=torch.int64, device=dev)
        self._unit_area = torch.zeros(u, k, dtype=torch.int64, device=dev)
        self._unit_area_total = torch.zeros(u, dtype=torch.int64, device=dev)
        self._category_images = torch.zeros(k, dtype=torch.int64, device=dev)
        self._images = 0

    # ------------------------------------------------------------------ update
    def update(
        self,
        masks: TensorLike,
        labels: TensorLike | Mapping[str, TensorLike] | Sequence[TensorLike],
        image_labels: TensorLike | Mapping[str, TensorLike] | Sequence[TensorLike] | None = None,
        thresholds: TensorLike | None = None,
    ) -> None:
        """Add a batch of images.

        Args:
            masks: ``[N, U, H, W]`` bool unit masks, or activations of any real dtype
                when ``thresholds`` is given (mask = activation >= threshold).
            labels: concept ids ``[N, H, W]`` or ``[N, L, H, W]`` (several labels per
                pixel; 0 = none; a concept repeated at a pixel counts once). A mapping
                or sequence of such tensors (one per category, as
                ``ConceptSource.collate`` gives) is concatenated along ``L``.
            image_labels: whole-image concept ids ``[N, K]`` (0-padded), each covering
                every pixel of its image; a mapping or sequence is concatenated
                along ``K``.
            thresholds: per-unit thresholds ``[U]`` when ``masks`` are activations.
        """
        masks = _as_tensor(masks).detach()
        if masks.ndim != 4 or masks.shape[1] != self.num_units:
            raise ValueError(
                f"IoU.update expects masks [N, U, H, W] with U = {self.num_units}, "
                f"got shape {tuple(masks.shape)}"
            )
        n, _, h, w = masks.shape
        dev = masks.device
        thr = self._check_thresholds(masks, thresholds)
        lab = _gather_labels(labels, "labels", (n, h, w)).to(dev)
        img = None
        if image_labels is not None:
            img = _gather_image_labels(image_labels, n).to(dev)
        self._check_ids(lab, "labels")
        if img is not None:
            self._check_ids(img, "image_labels")
        if n == 0:
            return
        tallies = self._tally(masks.reshape(n, self.num_units, h * w), thr, lab, img)
        self.to(dev)
        for name, value in tallies.items():
            acc = getattr(self, name)
            acc += value
        self._images += n

    def update_on(
        self,
        image: TensorLike,
        unit: TensorLike,
        pixel: TensorLike,
        labels: TensorLike | Mapping[str, TensorLike] | Sequence[TensorLike],
        image_labels: TensorLike | Mapping[str, TensorLike] | Sequence[TensorLike] | None = None,
    ) -> None:
        """Add a batch of images given only where their masks are on.

        Entry ``e`` says that unit ``unit[e]``'s mask is on at flat pixel ``pixel[e]``
        (``y * W + x``) of image ``image[e]`` of the batch; each (image, unit, pixel)
        at most once. The tallies are those :meth:`update` makes of the dense masks
        (tested equal), at a cost that grows with the on entries and the labels only:
        for thresholded dissection masks (0.5% on) far less than scanning ``[N, U,
        H, W]``. ``labels`` and ``image_labels`` are as in :meth:`update`; ``N``,
        ``H`` and ``W`` are the labels'. :meth:`update_flat` takes the same entries
        as flat indices (one array instead of three).
        """
        lab = _gather_labels(labels, "labels", None)
        n, _, h, w = lab.shape
        dev = lab.device
        entries = [_as_tensor(x).to(dev).reshape(-1) for x in (image, unit, pixel)]
        sizes = {len(x) for x in entries}
        if len(sizes) != 1 or any(x.dtype.is_floating_point for x in entries):
            raise ValueError(
                "IoU.update_on expects integer index arrays image, unit, pixel of one "
                f"length, got lengths {[len(x) for x in entries]}"
            )
        limits = {"image": n, "unit": self.num_units, "pixel": h * w}
        for x, (name, size) in zip(entries, limits.items(), strict=True):
            lo, hi = _value_range(x)
            if len(x) and (lo < 0 or hi >= size):
                raise ValueError(
                    f"IoU.update_on: {name} indices must lie in 0..{size - 1}, got {lo}..{hi}"
                )
        image, unit, pixel = (x.to(torch.int64) for x in entries)
        self._add_entries((image * self.num_units + unit) * (h * w) + pixel, lab, image_labels)

    def update_flat(
        self,
        index: TensorLike,
        labels: TensorLike | Mapping[str, TensorLike] | Sequence[TensorLike],
        image_labels: TensorLike | Mapping[str, TensorLike] | Sequence[TensorLike] | None = None,
    ) -> None:
        """Add a batch of images given the flat indices of their masks' on entries.

        ``index`` holds positions in the bool masks ``[N, U, H, W]`` of :meth:`update`
        (``((image * U + unit) * H + y) * W + x``, as ``np.flatnonzero(masks)`` or
        :meth:`nethook.upsample.ThresholdedUpsample.flat_on` give them), each at most
        once, in any order. The tallies are those of :meth:`update` on the dense
        masks and of :meth:`update_on` on the same entries, with the least index
        arithmetic of the three. ``labels`` and ``image_labels`` are as in
        :meth:`update`; ``N``, ``H`` and ``W`` are the labels'.
        """
        lab = _gather_labels(labels, "labels", None)
        n, _, h, w = lab.shape
        index = _as_tensor(index).to(lab.device).reshape(-1)
        if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
            raise ValueError(
                f"IoU.update_flat expects integer flat indices, got dtype {index.dtype}"
            )
        size = n * self.num_units * h * w
        lo, hi = _value_range(index)
        if len(index) and (lo < 0 or hi >= size):
            raise ValueError(
                f"IoU.update_flat: indices into masks [N, U, H, W] = [{n}, {self.num_units}, "
                f"{h}, {w}] must lie in 0..{size - 1}, got {lo}..{hi}"
            )
        if index.dtype not in (torch.int32, torch.int64):
            index = index.to(torch.int64)
        self._add_entries(index, lab, image_labels)

    def _add_entries(
        self,
        index: torch.Tensor,
        lab: torch.Tensor,
        image_labels: TensorLike | Mapping[str, TensorLike] | Sequence[TensorLike] | None,
    ) -> None:
        """Tally checked flat int32 / int64 indices of on entries against ``lab``."""
        n, _, h, w = lab.shape
        dev = lab.device
        img = None if image_labels is None else _gather_image_labels(image_labels, n).to(dev)
        self._check_ids(lab, "labels")
        if img is not None:
            self._check_ids(img, "image_labels")
        if n == 0:
            return
        chunk = self._chunk_labels(lab, img)
        out = self._empty_tallies(dev)
        area = _tally_flat(index, n, chunk, out)
        _add_whole_image(chunk, area, out["_intersection"])
        self._finish_chunk(chunk, area, h * w, out)
        self.to(dev)
        for name, value in out.items():
            acc = getattr(self, name)
            acc += value.round_().to(torch.int64) if value.is_floating_point() else value
        self._images += n

    def _chunk_labels(self, lab: torch.Tensor, img: torch.Tensor | None) -> _ChunkLabels:
        """Labels of a chunk of images, prepared; refuses ids missing from the table."""
        chunk = _ChunkLabels(lab, img, self.num_concepts)
        dev = lab.device
        unknown = torch.nonzero((chunk.present & ~self._is_concept(dev)).any(0)).reshape(-1)
        if unknown.numel():
            raise ValueError(
                f"IoU.update: labels contain concept ids {unknown[:10].tolist()} that "
                "are not in the concept table"
            )
        return chunk

    def _empty_tallies(self, dev: torch.device) -> dict[str, torch.Tensor]:
        """Zero tallies of one chunk (``_unit_area`` in float64, rounded at the end)."""
        u, c, k = self.num_units, self.num_concepts, self.num_categories
        return {
            "_intersection": torch.zeros(u, c, dtype=torch.int64, device=dev),
            "_label_area": torch.zeros(c, dtype=torch.int64, device=dev),
            "_unit_area": torch.zeros(u, k, dtype=torch.float64, device=dev),
            "_unit_area_total": torch.zeros(u, dtype=torch.int64, device=dev),
            "_category_images": torch.zeros(k, dtype=torch.int64, device=dev),
        }

    def _finish_chunk(
        self, chunk: _ChunkLabels, area: torch.Tensor, pixels: int, out: dict[str, torch.Tensor]
    ) -> None:
        """Add a chunk's label areas and category-conditioned unit areas.

        ``area`` ``[n, U]`` holds the units' mask areas per image.
        """
        dev = area.device
        cat_onehot = torch.zeros(self.num_concepts, self.num_categories, dtype=torch.float64)
        real = np.nonzero(self.concept_category >= 0)[0]
        cat_onehot[real, self.concept_category[real]] = 1
        has_category = (chunk.present.to(torch.float64) @ cat_onehot.to(dev) > 0).to(torch.float64)
        out["_label_area"] += chunk.label_area(pixels)
        out["_unit_area"] += area.T.to(torch.float64) @ has_category
        out["_unit_area_total"] += area.sum(0)
        out["_category_images"] += has_category.sum(0).to(torch.int64)

    def _check_thresholds(self, masks: torch.Tensor, thresholds: TensorLike | None):
        if thresholds is None:
            if masks.dtype != torch.bool:
                raise ValueError(
                    "IoU.update expects bool masks [N, U, H, W], or activations with "
                    f"thresholds=[U]; got masks of dtype {masks.dtype} and no thresholds"
                )
            return None
        if masks.dtype == torch.bool or masks.is_complex():
            raise ValueError(
                "IoU.update with thresholds expects real-valued activations, "
                f"got masks of dtype {masks.dtype}"
            )
        thr = _as_tensor(thresholds).to(masks.device)
        if thr.shape != (self.num_units,):
            raise ValueError(
                f"IoU.update expects thresholds of shape [U] = ({self.num_units},), "
                f"got {tuple(thr.shape)}"
            )
        return _exact_thresholds(thr, masks.dtype)

    def _check_ids(self, ids: torch.Tensor, name: str) -> None:
        if ids.numel() == 0:
            return
        lo, hi = _value_range(ids)
        if lo < 0 or hi >= self.num_concepts:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"IoU.update: {name} contain concept id {bad}, outside the concept "
                f"table (ids 0..{self.num_concepts - 1}, 0 = none)"
            )

    def _is_concept(self, device: torch.device) -> torch.Tensor:
        """``[C]`` bool: which ids are concepts (False for 0 and unused ids)."""
        return torch.as_tensor(self.concept_category >= 0, device=device)

    def _tally(
        self,
        masks: torch.Tensor,
        thr: torch.Tensor | None,
        lab: torch.Tensor,
        img: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """Tallies of one batch, computed on the masks' device.

        On CPU, unless the method is GEMM (whose torch kernels are multithreaded
        already), contiguous ranges of images are tallied in parallel threads, one
        per torch thread: the numpy kernels of the sparse tally release the GIL.
        """
        n, u, p = masks.shape
        dtype = torch.float32 if p < _EXACT_FLOAT32 else torch.float64
        item = torch.finfo(dtype).bits // 8
        n_chunk = max(1, min(n, self.chunk_bytes // (u * p * item)))
        starts = list(range(0, n, n_chunk))
        workers = 1
        if masks.device.type == "cpu" and self.method != "gemm":
            workers = min(torch.get_num_threads(), len(starts))
        ranges = [(g[0], min(n, g[-1] + n_chunk)) for g in np.array_split(starts, workers)]
        if workers == 1:
            return self._tally_images(masks, thr, lab, img, 0, n, dtype)
        with ThreadPoolExecutor(workers) as pool:
            parts = list(
                pool.map(lambda r: self._tally_images(masks, thr, lab, img, *r, dtype), ranges)
            )
        return {name: sum(part[name] for part in parts) for name in parts[0]}

    def _tally_images(
        self,
        masks: torch.Tensor,
        thr: torch.Tensor | None,
        lab: torch.Tensor,
        img: torch.Tensor | None,
        start: int,
        stop: int,
        dtype: torch.dtype,
    ) -> dict[str, torch.Tensor]:
        """Tallies of images ``start:stop``, block by block.

        Blocks are ``[images, U, pixels]`` slices sized by ``chunk_bytes``; each is
        tallied sparsely (indices of the mask's on pixels, bincount) or by the
        compact one-hot GEMM, as :attr:`method` and the block's density decide.
        """
        _, u, p = masks.shape
        dev = masks.device
        item = torch.finfo(dtype).bits // 8
        per_image = u * p * item
        n_chunk = max(1, min(stop - start, self.chunk_bytes // per_image))
        p_chunk = p if per_image <= self.chunk_bytes else max(1, self.chunk_bytes // (u * item))
        size = n_chunk * u * min(p, p_chunk)
        buffers = (
            torch.empty(size, dtype=dtype, device=dev),
            torch.empty(size, dtype=torch.bool, device=dev),
        )
        out = self._empty_tallies(dev)
        for i0 in range(start, stop, n_chunk):
            i1 = min(stop, i0 + n_chunk)
            chunk = self._chunk_labels(lab[i0:i1], None if img is None else img[i0:i1])
            area = self._tally_masks(masks[i0:i1], thr, chunk, p_chunk, buffers, out)
            self._finish_chunk(chunk, area, p, out)
        out["_unit_area"] = out["_unit_area"].round_().to(torch.int64)
        return out

    def _tally_masks(
        self,
        masks: torch.Tensor,
        thr: torch.Tensor | None,
        chunk: _ChunkLabels,
        p_chunk: int,
        buffers: tuple[torch.Tensor, torch.Tensor],
        out: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """Add a chunk's intersections to ``out``; return its unit areas ``[n, U]``.

        The chunk's masks ``[n, U, P]`` are cut into pixel blocks of ``p_chunk``;
        each is tallied sparsely or by GEMM (see :attr:`method`), using the float
        and bool ``buffers``.
        """
        n, u, p = masks.shape
        float_buf, bool_buf = buffers
        dense = self.method == "gemm" or (self.method == "auto" and masks.device.type != "cpu")
        gemm = None
        area = torch.zeros(n, u, dtype=torch.int64, device=masks.device)
        for p0 in range(0, p, p_chunk):
            block = masks[:, :, p0 : p0 + p_chunk]
            shape = tuple(block.shape)
            count = shape[0] * shape[1] * shape[2]
            if dense:
                gemm = gemm or _GemmTally(chunk, u, float_buf.dtype)
                gemm.add(_float_mask(block, thr, float_buf[:count].view(shape)), p0)
                continue
            on = _bool_mask(block, thr, bool_buf[:count].view(shape))
            if self.method == "auto" and _count_nonzero(on) > _SPARSE_DENSITY * count:
                gemm = gemm or _GemmTally(chunk, u, float_buf.dtype)
                gemm.add(float_buf[:count].view(shape).copy_(on.view(torch.uint8)), p0)
                continue
            area += _sparse_block(on, p0, chunk.pixel, out["_intersection"])
        _add_whole_image(chunk, area, out["_intersection"])
        if gemm is not None:
            area += gemm.finish(out["_intersection"])
        return area

    # ------------------------------------------------------------------ results
    def intersection(self) -> torch.Tensor:
        """``[U, C]`` int64 pixels where unit and concept are both on (C = id axis)."""
        return self._intersection.clone()

    def label_area(self) -> torch.Tensor:
        """``[C]`` int64 pixels labelled with each concept id."""
        return self._label_area.clone()

    def unit_area(self) -> torch.Tensor:
        """``[U, K]`` int64 unit mask area over images carrying category ``k``."""
        return self._unit_area.clone()

    def unit_area_total(self) -> torch.Tensor:
        """``[U]`` int64 unit mask area over all images (unconditioned)."""
        return self._unit_area_total.clone()

    def category_image_count(self) -> torch.Tensor:
        """``[K]`` int64 number of images carrying any label of each category."""
        return self._category_images.clone()

    def conditioned_unit_area(self) -> torch.Tensor:
        """``[U, C]`` int64 unit area over the images that count for each concept.

        Column ``c`` is ``unit_area()[:, category(c)]``; zero for ids that are not
        concepts (including 0).
        """
        cats = torch.as_tensor(self.concept_category, device=self._device)
        real = torch.nonzero(cats >= 0).reshape(-1)
        out = torch.zeros_like(self._intersection)
        out[:, real] = self._unit_area[:, cats[real]]
        return out

    def union(self) -> torch.Tensor:
        """``[U, C]`` int64 category-conditioned union ``A + L - I`` (0 for non-concepts)."""
        union = self.conditioned_unit_area() + self._label_area[None, :] - self._intersection
        return union.masked_fill_(~self._is_concept(self._device)[None, :], 0)

    def iou(self) -> torch.Tensor:
        """``[U, C]`` float64 IoU indexed by concept id (0 where the union is empty).

        Column 0 ("none") and ids that are not concepts are 0; see
        :meth:`iou_xarray` for the concept columns only, with names.
        """
        union = self.union().to(torch.float64)
        iou = self._intersection.to(torch.float64) / union.clamp(min=1)
        return iou.masked_fill_(union == 0, 0)

    def _concept_coords(self) -> tuple[np.ndarray, dict[str, Any]]:
        ids = np.nonzero(self.concept_category >= 0)[0]
        coords: dict[str, Any] = {
            "concept": ids,
            "concept_category": (
                "concept",
                [self.categories[k] for k in self.concept_category[ids]],
            ),
        }
        if self.concept_names is not None:
            coords["concept_name"] = ("concept", [self.concept_names[i] for i in ids])
        return ids, coords

    def iou_xarray(self, units: Sequence | None = None) -> xr.DataArray:
        """IoU as a ``DataArray[unit, concept]`` over the real concepts (id 0 dropped).

        Coordinates: ``unit`` (``units`` labels, default ``0..U-1``), ``concept``
        (ids), and along it ``concept_category`` (category name) and, when known,
        ``concept_name``.
        """
        ids, coords = self._concept_coords()
        return xr.DataArray(
            to_numpy(self.iou())[:, ids],
            dims=("unit", "concept"),
            coords={**xr_units(units, self.num_units), **coords},
            name="iou",
        )

    def to_xarray(self, units: Sequence | None = None) -> xr.Dataset:
        """All results as a Dataset: iou, intersection, union, label_area, unit_area.

        Dims ``unit``, ``concept`` (real concept ids, coordinates as in
        :meth:`iou_xarray`) and ``category`` (names); attribute ``images``.
        """
        ids, coords = self._concept_coords()
        return xr.Dataset(
            {
                "iou": (("unit", "concept"), to_numpy(self.iou())[:, ids]),
                "intersection": (("unit", "concept"), to_numpy(self._intersection)[:, ids]),
                "union": (("unit", "concept"), to_numpy(self.union())[:, ids]),
                "label_area": ("concept", to_numpy(self._label_area)[ids]),
                "unit_area": (("unit", "category"), to_numpy(self._unit_area)),
            },
            coords={
                **xr_units(units, self.num_units),
                **coords,
                "category": list(self.categories),
            },
            attrs={"images": self.image_count},
        )

    # ------------------------------------------------------------------ protocol
    def merge(self, other: Stat) -> None:
        """Add another IoU's tallies (same units, concept table and categories)."""
        self._check_merge(other)
        assert isinstance(other, IoU)
        if other.num_units != self.num_units:
            raise ValueError(
                f"cannot merge IoU of {other.num_units} units into one of {self.num_units}"
            )
        if not np.array_equal(other.concept_category, self.concept_category) or list(
            other.categories
        ) != list(self.categories):
            raise ValueError("cannot merge IoU stats with different concept tables or categories")
        for name in _TALLIES:
            acc = getattr(self, name)
            acc += getattr(other, name).to(self._device)
        self._images += other._images

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state: int64 tallies, the concept table and names (as JSON)."""
        return {
            **self._header(),
            "num_units": self.num_units,
            "chunk_bytes": self.chunk_bytes,
            "method": self.method,
            "concept_category": self.concept_category.copy(),
            "categories": json.dumps(list(self.categories)),
            "concept_names": json.dumps(self.concept_names),
            "image_count": int(self._images),
            **{name.lstrip("_"): to_numpy(getattr(self, name)) for name in _TALLIES},
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict` (tallies land on CPU)."""
        self._check_header(sd)
        self.num_units = int(np.asarray(sd["num_units"]))
        self.chunk_bytes = int(np.asarray(sd["chunk_bytes"]))
        self.method = str(np.asarray(sd["method"]))
        self.concept_category = np.asarray(sd["concept_category"], dtype=np.int64).copy()
        self.categories = [str(c) for c in json.loads(str(np.asarray(sd["categories"])))]
        names = json.loads(str(np.asarray(sd["concept_names"])))
        self.concept_names = None if names is None else [str(x) for x in names]
        self._device = torch.device("cpu")
        self._zero_tallies()
        for name in _TALLIES:
            value = np.asarray(sd[name.lstrip("_")], dtype=np.int64)
            expected = tuple(getattr(self, name).shape)
            if value.shape != expected:
                raise ValueError(
                    f"IoU state_dict entry {name.lstrip('_')!r} has shape {value.shape}, "
                    f"expected {expected}"
                )
            setattr(self, name, torch.from_numpy(value.copy()))
        self._images = int(np.asarray(sd["image_count"]))

    def to(self, device: torch.device | str) -> IoU:
        """Move the tallies to ``device``; return ``self``."""
        self._device = torch.device(device)
        for name in _TALLIES:
            setattr(self, name, getattr(self, name).to(self._device))
        return self

    def __repr__(self) -> str:
        return (
            f"IoU(num_units={self.num_units}, concepts={int((self.concept_category >= 0).sum())}, "
            f"categories={list(self.categories)}, images={self.image_count})"
        )


_TALLIES = ("_intersection", "_label_area", "_unit_area", "_unit_area_total", "_category_images")


_METHODS = ("auto", "gemm", "sparse")
_SPARSE_DENSITY = 0.05


class _ChunkLabels:
    """The labels of a chunk of images, prepared once for either tally method.

    ``pixel`` is ``[n, L, P]`` with every label that would be counted twice set to
    0: a repeat of an earlier layer's label at the same pixel, and a concept that is
    also a whole-image label of that image (it covers the pixel already); read only
    (on CPU, the given labels themselves when no label needs clearing).
    ``present`` ``[n, C]`` marks the concepts each image carries (0 excluded);
    ``whole_pairs`` are the (image, concept) pairs given as whole-image labels.
    On CPU the work runs in numpy (several times faster than torch's kernels here).
    """

    def __init__(self, lab: torch.Tensor, img: torch.Tensor | None, concepts: int) -> None:
        n, layers, h, w = lab.shape
        lab = lab.reshape(n, layers, h * w)
        whole = torch.zeros(n, concepts, dtype=torch.bool, device=lab.device)
        if img is not None:
            whole.scatter_(1, img.long(), True)
        whole[:, 0] = False
        if _numpy_view(lab) is not None:
            self._prepare_numpy(lab.numpy(), whole.numpy(), concepts)
        else:
            self._prepare_torch(lab, whole, img is not None)
        self.whole_pairs = torch.nonzero(whole, as_tuple=True)

    def _prepare_numpy(self, lab: np.ndarray, whole: np.ndarray, concepts: int) -> None:
        n, layers, p = lab.shape
        pixel = lab  # read only: copied before any label is cleared
        per_layer = _label_counts(pixel, concepts)
        held = per_layer.any(0)
        held[:, 0] = False
        if (held.sum(0) > 1).any():  # an id in two layers: it may repeat at a pixel
            pixel = lab.copy()
            for layer in range(1, layers):
                repeat = lab[:, 0] == lab[:, layer]
                for earlier in range(1, layer):
                    repeat |= lab[:, earlier] == lab[:, layer]
                np.copyto(pixel[:, layer], 0, where=repeat)
            per_layer = _label_counts(pixel, concepts)
        counts = per_layer.sum(1)
        if (counts.astype(bool) & whole).any():  # a pixel label that is also a whole label
            pixel = pixel.copy() if pixel is lab else pixel
            pixel[np.take_along_axis(whole, pixel.reshape(n, -1), 1).reshape(pixel.shape)] = 0
            counts = _label_counts(pixel, concepts).sum(1)
        counts[:, 0] = 0
        self.pixel = torch.from_numpy(pixel)
        self.present = torch.from_numpy((counts > 0) | whole)
        self._area = torch.from_numpy(counts.sum(0))

    def _prepare_torch(self, lab: torch.Tensor, whole: torch.Tensor, has_whole: bool) -> None:
        n, layers, p = lab.shape
        lab = lab.long()
        pixel = lab.clone()
        for layer in range(1, layers):
            repeat = (lab[:, layer : layer + 1] == lab[:, :layer]).any(1)
            pixel[:, layer].masked_fill_(repeat, 0)
        if has_whole:
            pixel.masked_fill_(whole.gather(1, pixel.view(n, layers * p)).view_as(pixel), 0)
        present = whole.clone()
        present.scatter_(1, pixel.view(n, layers * p), True)
        present[:, 0] = False
        self.pixel = pixel
        self.present = present
        self._area = None

    def label_area(self, pixels: int) -> torch.Tensor:
        """``[C]`` int64 labelled pixels per concept (whole-image labels cover all)."""
        concepts = self.present.shape[1]
        if self._area is not None:
            area = self._area.clone()
        else:
            area = torch.bincount(self.pixel.reshape(-1), minlength=concepts)
            area[0] = 0
        rows, ids = self.whole_pairs
        return area.index_add_(0, ids, torch.full_like(ids, pixels))


def _label_counts(pixel: np.ndarray, concepts: int) -> np.ndarray:
    """``[n, L, C]`` int64: pixels of each image's label layer holding each id.

    Label maps are mostly uniform regions, so the ids are counted run by run (a
    bincount of each run's id weighted by its length, exact in float64): work per
    run, not per pixel. Where runs are short the ids are counted one by one, with
    keys running pixel-major so that neighbouring increments hit different counters.
    """
    n, layers, p = pixel.shape
    flat = pixel.reshape(-1)
    bins = n * layers * concepts
    if len(flat) == 0:
        return np.zeros((n, layers, concepts), dtype=np.int64)
    change = np.empty(len(flat), dtype=bool)
    np.not_equal(flat[1:], flat[:-1], out=change[1:])
    change[::p] = True  # runs stop at the end of each layer of each image
    starts = np.flatnonzero(change)
    if len(starts) <= len(flat) // 4:
        lengths = np.diff(starts, append=len(flat))
        keys = flat.take(starts) + starts // p * concepts
        counts = np.bincount(keys, weights=lengths, minlength=bins).astype(np.int64)
    else:
        keys = np.empty((p, n * layers), dtype=np.intp)
        np.add(flat.reshape(n * layers, p).T, np.arange(n * layers) * concepts, out=keys)
        counts = np.bincount(keys.reshape(-1), minlength=bins)
    return counts.reshape(n, layers, concepts)


class _GemmTally:
    """Dense tally of one chunk: ``mask[n, U, P] @ onehot[n, P, c_max + 1]``.

    The one-hot holds only the concepts present in each image; column 0 is all
    ones, so its product is the unit's area (label 0 lands there harmlessly).
    """

    def __init__(self, chunk: _ChunkLabels, units: int, dtype: torch.dtype) -> None:
        n, layers, p = chunk.pixel.shape
        present = chunk.present
        self.local = present.cumsum(1) * present
        c_max = int(self.local.max()) if self.local.numel() else 0
        onehot = torch.zeros(n, p, c_max + 1, dtype=dtype, device=present.device)
        onehot[:, :, 0] = 1
        pixel_local = self.local.gather(1, chunk.pixel.long().view(n, layers * p))
        pixel_local = pixel_local.view(n, layers, p)
        onehot.scatter_(2, pixel_local.transpose(1, 2), 1)
        rows, ids = chunk.whole_pairs
        onehot[rows, :, self.local[rows, ids]] = 1
        self.onehot = onehot
        self.present = present
        self.prod = torch.zeros(n, units, c_max + 1, dtype=dtype, device=present.device)

    def add(self, block: torch.Tensor, p0: int) -> None:
        """Accumulate a float 0/1 mask block ``[n, U, pixels]`` starting at pixel p0."""
        self.prod.baddbmm_(block, self.onehot[:, p0 : p0 + block.shape[2]])

    def finish(self, intersection: torch.Tensor) -> torch.Tensor:
        """Add the intersections to ``intersection`` ``[U, C]``; return area ``[n, U]``."""
        counts = self.prod.round_().to(torch.int64)
        rows, ids = torch.nonzero(self.present, as_tuple=True)
        intersection.index_add_(1, ids, counts[rows, :, self.local[rows, ids]].T)
        return counts[:, :, 0]


def _sparse_block(
    on: torch.Tensor, p0: int, pixel: torch.Tensor, intersection: torch.Tensor
) -> torch.Tensor:
    """Tally a bool block ``[n, U, pixels]`` from the indices of its on entries.

    Adds every (unit, pixel label) pair to ``intersection`` ``[U, C]`` by one
    bincount (label 0 lands in column 0, cleared by the caller); returns the
    block's unit areas ``[n, U]``. On CPU the index arithmetic runs in numpy,
    3-6x faster than torch's at these sizes.
    """
    n, units, width = on.shape
    layers, pixels = pixel.shape[1:]
    concepts = intersection.shape[1]
    on_np = _numpy_view(on)
    if on_np is not None:
        flat = np.flatnonzero(on_np)
        label_of = pixel.numpy().reshape(-1)
        offsets = np.arange(layers) * pixels
        bincount = np.bincount
    else:
        flat = torch.nonzero(on.reshape(-1)).reshape(-1)
        label_of = pixel.reshape(-1)
        offsets = torch.arange(layers, device=on.device) * pixels
        bincount = torch.bincount
    image_unit = flat // width
    px = flat - image_unit * width + p0
    image = image_unit // units
    unit = image_unit - image * units
    labels = label_of[(image * (layers * pixels) + px)[:, None] + offsets]
    keys = (unit[:, None] * concepts + labels).reshape(-1)
    counts = torch.as_tensor(bincount(keys, minlength=units * concepts))
    intersection += counts.to(intersection.device).view(units, concepts)
    area = torch.as_tensor(bincount(image_unit, minlength=n * units))
    return area.to(intersection.device).view(n, units)


def _add_whole_image(chunk: _ChunkLabels, area: torch.Tensor, intersection: torch.Tensor) -> None:
    """Clear column 0 ("none") of the pixel tallies; add each whole-image label's
    intersection, which is the unit's whole area in that image."""
    intersection[:, 0] = 0
    rows, ids = chunk.whole_pairs
    views = [_numpy_view(t) for t in (intersection, area, rows, ids)]
    if all(v is not None for v in views):
        inter, area_np, rows_np, ids_np = views
        np.add.at(inter.T, ids_np, area_np[rows_np])
    else:
        intersection.index_add_(1, ids, area[rows].T)


def _tally_flat(
    index: torch.Tensor, n: int, chunk: _ChunkLabels, out: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Tally on entries, flat int32 or int64 indices into ``[n, U, P]``, against the
    chunk's pixel labels ``[n, L, P]``.

    Adds every (unit, pixel label) pair to ``out["_intersection"]`` by bincounts
    (label 0 lands in column 0, cleared later); returns the unit areas ``[n, U]``
    (a bincount of ``image * U + unit``, which is the index divided by ``P``).
    """
    intersection = out["_intersection"]
    units, concepts = intersection.shape
    pixel = chunk.pixel
    layers, pixels = pixel.shape[1:]
    view = _numpy_view(index)
    if view is not None:
        counts, area = _tally_flat_numpy(view, pixel.numpy(), units, concepts)
    else:
        index = index.to(torch.int64)
        found = index // pixels  # image * U + unit
        image = found // units
        at = index - found * pixels + image * (layers * pixels)  # the layer-0 label
        offsets = torch.arange(layers, device=index.device)[:, None] * pixels
        keys = (found - image * units) * concepts + pixel.reshape(-1)[at + offsets]
        counts = torch.bincount(keys.reshape(-1), minlength=units * concepts)
        area = torch.bincount(found, minlength=n * units)
    intersection += counts.to(intersection.device).view(units, concepts)
    return area.to(intersection.device).view(n, units)


def _tally_flat_numpy(
    index: np.ndarray, pixel: np.ndarray, units: int, concepts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_tally_flat`'s counts ``[U * C]`` and areas ``[n * U]``, in numpy.

    The index arithmetic runs in int32 where it fits (twice the values per byte
    moved); each layer's labels are gathered from its own plane and counted by a
    bincount of their own (faster than one bincount of all layers' keys).
    """
    n, layers, pixels = pixel.shape
    if n * layers * pixels >= 2**31:
        index = index.astype(np.int64)
    labels = pixel.reshape(-1)
    found = index // pixels  # image * U + unit
    image = found // units
    at = (index - found * pixels + image * (layers * pixels)).astype(np.intp)  # layer 0's
    unit_key = ((found - image * units) * concepts).astype(np.intp)
    counts = np.zeros(units * concepts, dtype=np.int64)
    for layer in range(layers):
        counts += np.bincount(unit_key + labels[layer * pixels :].take(at), minlength=len(counts))
    area = np.bincount(found, minlength=n * units)
    return torch.from_numpy(counts), torch.from_numpy(area)


def _value_range(t: torch.Tensor) -> tuple[int, int]:
    """``(min, max)`` of a non-empty tensor (numpy's reductions on CPU: much faster)."""
    if t.numel() == 0:
        return 0, 0
    view = _numpy_view(t)
    if view is not None:
        return int(view.min()), int(view.max())
    return int(t.min()), int(t.max())


def _numpy_view(t: torch.Tensor) -> np.ndarray | None:
    """A numpy view of a CPU tensor whose dtype numpy has, else None."""
    if t.device.type != "cpu" or t.dtype == torch.bfloat16:
        return None
    return t.detach().numpy()


def _exact_thresholds(thr: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Thresholds in the activations' float ``dtype`` that keep ``act >= thr`` exact.

    Each is rounded up to the nearest value representable in ``dtype``, so a
    comparison in that dtype (fast, no upcast of the activations) gives the same
    mask as one in float64. Integer activations compare against float64.
    """
    wide = thr.to(torch.float64)
    if not dtype.is_floating_point:
        return wide
    near = wide.to(dtype)
    up = torch.nextafter(near, torch.full_like(near, float("inf")))
    return torch.where(near.to(torch.float64) < wide, up, near)


def _bool_mask(block: torch.Tensor, thr: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """The bool mask of a block (itself when already bool), written into ``out``."""
    if thr is None:
        return block
    a, t, o = _numpy_view(block), _numpy_view(thr), _numpy_view(out)
    if a is not None and t is not None and o is not None:
        np.greater_equal(a, t[None, :, None], out=o)
    else:
        torch.ge(block, thr[None, :, None], out=out)
    return out


def _float_mask(block: torch.Tensor, thr: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """The 0/1 float mask of a block, written into ``out``."""
    if thr is None:
        return out.copy_(block.view(torch.uint8))
    return torch.ge(block, thr[None, :, None], out=out)


def _count_nonzero(on: torch.Tensor) -> int:
    a = _numpy_view(on)
    return int(np.count_nonzero(a)) if a is not None else int(torch.count_nonzero(on))


def _as_tensor(x: TensorLike) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return torch.as_tensor(np.asarray(x))


def _integer(t: torch.Tensor, name: str) -> torch.Tensor:
    """Concept ids in their own integer dtype (narrow ids move fewer bytes), or int64."""
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise ValueError(f"IoU.update expects integer concept ids in {name}, got dtype {t.dtype}")
    if t.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        return t
    return t.to(torch.int64)


def _gather_labels(labels, name: str, nhw: tuple[int, int, int] | None) -> torch.Tensor:
    """Pixel labels as one int64 ``[N, L, H, W]`` tensor, checked against ``nhw``
    (when None, the parts must agree with the first one)."""
    parts = list(labels.values()) if isinstance(labels, Mapping) else None
    if parts is None and isinstance(labels, list | tuple):
        parts = list(labels)
    if parts is None:
        parts = [labels]
    if not parts:
        raise ValueError(f"IoU.update: {name} is empty; expected [N, H, W] or [N, L, H, W]")
    layers = []
    for part in parts:
        t = _as_tensor(part)
        if t.ndim == 3:
            t = t[:, None]
        if t.ndim != 4:
            raise ValueError(
                f"IoU.update expects {name} of shape [N, H, W] or [N, L, H, W], "
                f"got shape {tuple(t.shape)}"
            )
        n, h, w = nhw if nhw is not None else (t.shape[0], *t.shape[2:])
        nhw = (n, h, w)
        if t.shape[0] != n:
            raise ValueError(f"IoU.update: {name} have N = {t.shape[0]} images, masks have {n}")
        if tuple(t.shape[2:]) != (h, w):
            raise ValueError(
                f"IoU.update: {name} are {t.shape[2]}x{t.shape[3]} but masks are {h}x{w}; "
                "upsample activations to the label resolution first"
            )
        layers.append(_integer(t, name))
    return layers[0] if len(layers) == 1 else torch.cat([x.to(layers[0].device) for x in layers], 1)


def _gather_image_labels(image_labels, n: int) -> torch.Tensor:
    """Whole-image labels as one int64 ``[N, K]`` tensor."""
    if isinstance(image_labels, Mapping):
        parts = list(image_labels.values())
    elif isinstance(image_labels, list | tuple):
        parts = list(image_labels)
    else:
        parts = [image_labels]
    cols = []
    for part in parts:
        t = _as_tensor(part)
        if t.ndim != 2 or t.shape[0] != n:
            raise ValueError(
                f"IoU.update expects image_labels of shape [N, K] with N = {n}, "
                f"got shape {tuple(t.shape)}"
            )
        cols.append(_integer(t, "image_labels"))
    if not cols:
        return torch.zeros(n, 0, dtype=torch.int64)
    return cols[0] if len(cols) == 1 else torch.cat([c.to(cols[0].device) for c in cols], 1)


def _from_category_array(
    concept_category: TensorLike | Sequence[int], categories: Sequence[str] | None
) -> tuple[np.ndarray, list[str]]:
    table = np.asarray(
        concept_category.cpu() if isinstance(concept_category, torch.Tensor) else concept_category
    )
    if table.ndim != 1 or table.size < 2 or not np.issubdtype(table.dtype, np.integer):
        raise ValueError(
            "IoU concept_category must be a 1-D int array indexed by concept id "
            f"(at least ids 0 and 1), got shape {table.shape} dtype {table.dtype}"
        )
    table = table.astype(np.int64).copy()
    table[0] = -1
    table[table < 0] = -1
    count = int(table.max()) + 1
    if count < 1:
        raise ValueError("IoU concept_category lists no concept (every entry is negative)")
    if categories is None:
        cats = [str(k) for k in range(count)]
    else:
        cats = [str(c) for c in categories]
        if len(cats) < count:
            raise ValueError(
                f"IoU concept_category uses category index {count - 1} but only "
                f"{len(cats)} categories are named"
            )
    return table, cats


def _from_concepts_table(
    df: pd.DataFrame, categories: Sequence[str] | None
) -> tuple[np.ndarray, list[str], list[str] | None]:
    missing = {"id", "category"} - set(df.columns)
    if missing:
        raise ValueError(
            f"IoU concepts table needs columns 'id' and 'category', missing {sorted(missing)}"
        )
    ids = df["id"].to_numpy()
    if len(ids) == 0 or not np.issubdtype(ids.dtype, np.integer) or ids.min() < 1:
        raise ValueError("IoU concepts table needs integer ids >= 1 (0 is reserved for none)")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("IoU concepts table has duplicate concept ids")
    cat_values = [str(c) for c in df["category"]]
    cats = list(dict.fromkeys(cat_values)) if categories is None else [str(c) for c in categories]
    index = {c: k for k, c in enumerate(cats)}
    unknown = sorted(set(cat_values) - set(index))
    if unknown:
        raise ValueError(f"IoU concepts table has categories {unknown} not in categories={cats}")
    table = np.full(int(ids.max()) + 1, -1, dtype=np.int64)
    table[ids] = [index[c] for c in cat_values]
    names = None
    if "name" in df.columns:
        names = [""] * len(table)
        names[0] = "none"
        for i, name in zip(ids, df["name"], strict=True):
            names[int(i)] = str(name)
    return table, cats, names
