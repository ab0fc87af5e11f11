"""Upsampling activation maps to label resolution, anchored at receptive-field centres.

A conv feature map is a grid of samples; cell ``(i, j)`` of a layer sits at the
centre of its receptive field in the input image, at input pixel coordinates
``offset + stride * (i, j)`` (pixel centres at integers). :class:`Geometry` holds that
stride and offset; :func:`upsample` evaluates the bilinear interpolation of the grid
at the centre of every label pixel (clamped at the border), so a unit's mask lines
up with the image the way the network actually sees it (thesis §3.2).

Where the geometry is not known, :meth:`Geometry.uniform` spreads the cells evenly
over the image (``align_corners=False`` bilinear resizing).
:class:`ThresholdedUpsample` finds where an upsampled map reaches a threshold without
upsampling it: only around the cells that reach it (dissection's masks).
:func:`infer_geometry` derives it exactly for chains of convolutions and poolings
(``nn.Sequential`` models such as AlexNet, VGG or the demo CNN).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Geometry:
    """Where feature cells sit in input pixel coordinates: ``offset + stride * index`` (y, x)."""

    stride: tuple[float, float]
    offset: tuple[float, float]

    @classmethod
    def uniform(cls, input_size: tuple[int, int], feature_size: tuple[int, int]) -> Geometry:
        """Cells spread evenly over the input (no receptive-field knowledge)."""
        stride = tuple(i / f for i, f in zip(input_size, feature_size, strict=True))
        return cls(stride=stride, offset=tuple((s - 1) / 2 for s in stride))

    def then(self, inner: Geometry) -> Geometry:
        """The geometry of a layer whose input has geometry ``self`` and which maps with ``inner``."""
        stride = tuple(a * b for a, b in zip(self.stride, inner.stride, strict=True))
        offset = tuple(
            o + s * io for o, s, io in zip(self.offset, self.stride, inner.offset, strict=True)
        )
        return Geometry(stride=stride, offset=offset)


IDENTITY = Geometry(stride=(1.0, 1.0), offset=(0.0, 0.0))


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def module_geometry(module: nn.Module) -> Geometry | None:
    """The cell geometry one module applies, or ``None`` if it is not a known spatial op.

    Convolutions and max/avg pooling map output cell ``i`` to input position
    ``stride * i - padding + dilation * (kernel - 1) / 2``; pointwise modules
    (activations, batch norm, dropout) keep it. A custom module may declare its own
    by a ``nethook_geometry`` attribute (a :class:`Geometry`).
    """
    declared = getattr(module, "nethook_geometry", None)
    if isinstance(declared, Geometry):
        return declared
    if isinstance(module, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
        k = _pair(module.kernel_size)
        s = _pair(module.stride if module.stride is not None else module.kernel_size)
        p = _pair(module.padding)
        d = _pair(getattr(module, "dilation", 1))
        if isinstance(module.padding, str):
            return None
        off = tuple(-pp + dd * (kk - 1) / 2 for kk, pp, dd in zip(k, p, d, strict=True))
        return Geometry(stride=tuple(float(x) for x in s), offset=off)
    pointwise = (
        nn.ReLU,
        nn.LeakyReLU,
        nn.GELU,
        nn.SiLU,
        nn.Sigmoid,
        nn.Tanh,
        nn.BatchNorm2d,
        nn.GroupNorm,
        nn.Dropout,
        nn.Dropout2d,
        nn.Identity,
        nn.LocalResponseNorm,
    )
    if isinstance(module, pointwise):
        return IDENTITY
    return None


def infer_geometry(model: nn.Module, layer: str) -> Geometry | None:
    """Exact cell geometry of ``layer`` when the path to it is a chain of known ops.

    Walks ``nn.Sequential`` containers from the model's root down to ``layer``,
    composing the geometry of every module that runs before it (and of ``layer``
    itself). Returns ``None`` as soon as anything else is met (a residual block, a
    custom module), in which case callers fall back to :meth:`Geometry.uniform`.
    """
    modules = dict(model.named_modules())
    if layer not in modules:
        raise KeyError(f"layer {layer!r} is not a module of the model")
    parts = layer.split(".") if layer else []
    geometry = IDENTITY
    container: nn.Module = model
    for depth, name in enumerate(parts):
        if not isinstance(container, nn.Sequential):
            return None
        for child_name, child in container.named_children():
            if child_name == name:
                break
            g = _chain_geometry(child)
            if g is None:
                return None
            geometry = geometry.then(g)
        container = getattr(container, name)
        if depth == len(parts) - 1:
            g = _chain_geometry(container)
            if g is None:
                return None
            geometry = geometry.then(g)
    return geometry


def _chain_geometry(module: nn.Module) -> Geometry | None:
    if isinstance(module, nn.Sequential):
        g = IDENTITY
        for child in module:
            inner = _chain_geometry(child)
            if inner is None:
                return None
            g = g.then(inner)
        return g
    return module_geometry(module)


def _close(a: Geometry, b: Geometry) -> bool:
    pairs = zip((*a.stride, *a.offset), (*b.stride, *b.offset), strict=True)
    return all(abs(x - y) < 1e-9 for x, y in pairs)


def is_identity(
    feature_size: tuple[int, int],
    size: tuple[int, int],
    input_size: tuple[int, int],
    geometry: Geometry | None = None,
) -> bool:
    """Whether :func:`upsample` returns feature maps of ``feature_size`` unchanged."""
    if geometry is None:
        geometry = Geometry.uniform(input_size, feature_size)
    same = tuple(feature_size) == tuple(size) == tuple(input_size)
    return same and _close(geometry, IDENTITY)


def upsample(
    maps: torch.Tensor,
    size: tuple[int, int],
    input_size: tuple[int, int],
    geometry: Geometry | None = None,
) -> torch.Tensor:
    """Bilinearly resample ``maps`` ``[B, C, h, w]`` to ``size`` = (H_label, W_label).

    ``input_size`` is the (H, W) of the image the network saw; label pixel centres
    are placed on it (the label map covers the image), and each is given the
    bilinear interpolation of the feature cells around it at their ``geometry``
    positions, clamped at the outermost cells. Runs on the device of ``maps``.
    """
    if maps.ndim != 4:
        raise ValueError(f"upsample expects [B, C, h, w] maps, got shape {tuple(maps.shape)}")
    h, w = maps.shape[-2:]
    if geometry is None:
        geometry = Geometry.uniform(input_size, (h, w))
    if is_identity((h, w), size, input_size, geometry):
        return maps
    ry, rx = (
        interpolation_matrix(n_label, n_input, n_cells, stride, offset, maps.device)
        for n_label, n_input, n_cells, stride, offset in zip(
            size, input_size, (h, w), geometry.stride, geometry.offset, strict=True
        )
    )
    out = ry @ maps.float() @ rx.T  # separable bilinear: rows, then columns
    return out.to(maps.dtype)


def interpolation_matrix(
    n_label: int,
    n_input: int,
    n_cells: int,
    stride: float,
    offset: float,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``[n_label, n_cells]`` weights of linear interpolation along one axis.

    Row ``j`` holds the weights of the cells around label pixel ``j``'s centre
    (input coordinate ``(j + 0.5) * n_input / n_label - 0.5``), at cell positions
    ``offset + stride * i``, clamped to the outermost cells; each row sums to 1.
    """
    lo, hi, frac = (
        torch.from_numpy(a) for a in axis_weights(n_label, n_input, n_cells, stride, offset)
    )
    m = torch.zeros(n_label, n_cells, dtype=torch.float64)
    rows = torch.arange(n_label)
    m.index_put_((rows, lo), 1 - frac, accumulate=True)
    m.index_put_((rows, hi), frac, accumulate=True)
    return m.to(device=device, dtype=torch.float32)


def axis_weights(
    n_label: int, n_input: int, n_cells: int, stride: float, offset: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per label pixel along one axis: lower cell, upper cell, and the upper's weight.

    Pixel ``j``'s value is ``(1 - frac[j]) * cell[lo[j]] + frac[j] * cell[hi[j]]``
    (float64 weights; ``lo`` never decreases with ``j``, ``hi = min(lo + 1, n - 1)``).
    """
    centre = (np.arange(n_label, dtype=np.float64) + 0.5) * (n_input / n_label) - 0.5
    cell = np.clip((centre - offset) / stride, 0, n_cells - 1)
    lo = np.minimum(np.floor(cell).astype(np.int64), n_cells - 1)
    hi = np.minimum(lo + 1, n_cells - 1)
    return lo, hi, cell - lo


class ThresholdedUpsample:
    """Where ``upsample(maps) >= threshold``, found from the cells that reach it.

    A label pixel's value is a convex combination of the 2 x 2 cells around it, so it
    can reach a threshold only if one of them does. Label pixels are grouped into
    *tiles* by their top-left support cell (tiles are disjoint rectangles); only the
    tiles next to a hot cell (one at or above its unit's threshold) are evaluated
    and compared. With a top quantile of 0.5% that is a few percent of the pixels,
    and nothing of size ``[N, U, H, W]`` is formed.

    Values are the bilinear interpolation :func:`upsample` computes, as two lerps
    ``a + (b - a) * f`` (along x, then y) in the maps' float dtype (at least
    float32), so a plateau of cells equal to the threshold stays on; ``upsample``'s
    matrix products may round differently within one unit in the last place.
    Runs in numpy (CPU). Everything that depends only on the shapes (per cell: its
    tile's group, corner offsets, first pixel; per group: the pixel offsets; the
    weights tiles share) is tabulated once, here.
    """

    def __init__(
        self,
        feature_size: tuple[int, int],
        size: tuple[int, int],
        input_size: tuple[int, int],
        geometry: Geometry | None = None,
    ) -> None:
        self.feature_size = tuple(feature_size)
        self.size = tuple(size)
        if geometry is None:
            geometry = Geometry.uniform(input_size, self.feature_size)
        self.identity = is_identity(self.feature_size, self.size, input_size, geometry)
        self.axes = [
            _AxisTiles(*axis_weights(n_label, n_input, n_cells, stride, offset), n_cells)
            for n_label, n_input, n_cells, stride, offset in zip(
                self.size,
                input_size,
                self.feature_size,
                geometry.stride,
                geometry.offset,
                strict=True,
            )
        ]
        self._cells = _CellTable(*self.axes, self.size[1])

    def on(
        self, maps: np.ndarray, threshold: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(image, unit, pixel)`` int64 arrays of the entries of ``[N, U, H, W]`` that
        are on, for ``maps`` ``[N, U, h, w]`` (float) and ``threshold`` ``[U]``.

        ``pixel`` is ``y * W + x`` at the label size; each entry appears once, in no
        particular order. :meth:`flat_on` gives the same entries as flat indices.
        """
        u = maps.shape[1]
        index = self.flat_on(maps, threshold).astype(np.int64)
        found, pixel = _split(index, self.size[0] * self.size[1])
        image, unit = _split(found, u)
        return image, unit, pixel

    def flat_on(
        self,
        maps: np.ndarray,
        threshold: np.ndarray,
        *,
        units: int | None = None,
        offset: int = 0,
        cells: np.ndarray | None = None,
    ) -> np.ndarray:
        """Flat indices of the on entries of ``upsample(maps) >= threshold``.

        ``maps`` ``[N, U, h, w]`` (float) and ``threshold`` ``[U]`` as in :meth:`on`.
        The indices point into a bool mask ``[N, units, H, W]`` (default ``units =
        U``) in which these maps' units are ``offset .. offset + U - 1``: several
        layers' entries then index one mask with their units side by side, as
        :meth:`nethook.stats.IoU.update_flat` takes them. Each entry appears once,
        in no particular order. The dtype is int32 when the mask has fewer than
        2**31 entries (half the bytes to move), else int64.

        ``cells``, when given, are flat indices into ``maps`` (each at most once) of
        every cell that may reach its unit's threshold, such as the few cells a
        sparse record of the maps holds: only they are compared, instead of every
        cell of ``maps`` (the one pass over all of them that remains otherwise).
        """
        n, u, h, w = maps.shape
        units = u if units is None else int(units)
        if (h, w) != self.feature_size or threshold.shape != (u,):
            raise ValueError(
                f"ThresholdedUpsample for {self.feature_size} maps got maps of shape "
                f"{maps.shape} and thresholds of shape {threshold.shape}"
            )
        if offset < 0 or offset + u > units:
            raise ValueError(
                f"ThresholdedUpsample.flat_on: units {offset}..{offset + u - 1} of the "
                f"maps do not fit a mask of {units} units"
            )
        dtype = np.result_type(maps.dtype, np.float32)
        maps = np.ascontiguousarray(maps, dtype=dtype)
        thr = threshold.astype(dtype)
        if cells is None:
            hot = _sparse_flatnonzero(maps >= thr[None, :, None, None])
        else:
            cells = np.asarray(cells, dtype=np.int64).reshape(-1)
            if len(cells) and (cells.min() < 0 or cells.max() >= maps.size):
                raise ValueError(
                    "ThresholdedUpsample.flat_on: cells must be flat indices into maps "
                    f"(0..{maps.size - 1}), got {cells.min()}..{cells.max()}"
                )
            unit = cells // (h * w) % u
            hot = cells[maps.reshape(-1).take(cells) >= thr.take(unit)]
        place = _Placement(n, u, units, offset, self.size[0] * self.size[1])
        if self.identity:
            found, pixel = _split(hot, h * w)
            return place(found, pixel)
        flat = maps.reshape(-1)
        per_map = np.tile(thr, n)
        parts = [
            self._evaluate(group, tiles, flat, per_map, dtype, place)
            for group, tiles in self._cells.candidates(hot, n * u)
        ]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=place.dtype)

    def _evaluate(
        self,
        group: int,
        tiles: np.ndarray,
        flat: np.ndarray,
        per_map: np.ndarray,
        dtype: np.dtype,
        place: _Placement,
    ) -> np.ndarray:
        """The on entries of ``tiles`` (flat int64 indices of their top-left cells, all
        of tile ``group``), as ``place`` numbers them.

        Arrays are laid out ``[pixel of the tile, tile]`` so that every numpy loop
        runs along the long tile axis; the entries are picked from a table of every
        tile pixel's index by the comparison itself (no per-entry arithmetic).
        """
        cells, ay, ax = self._cells, *self.axes
        shape = cells.groups[group]
        th, tw = shape.height, shape.width
        found, cell = _split(tiles, cells.count)
        right = tiles + cells.right.take(cell)
        down = cells.down.take(cell)
        a00, a01 = flat.take(tiles), flat.take(right)
        a10, a11 = flat.take(tiles + down), flat.take(right + down)
        row, col = cells.row.take(cell), cells.col.take(cell)
        fx = ax.weights(tw, col, dtype, shape.ragged)  # [tw, tiles] or [tw, 1]
        fy = ay.weights(th, row, dtype, shape.ragged)  # [th, tiles] or [th, 1]
        top = (a01 - a00) * fx
        top += a00
        bottom = (a11 - a10) * fx
        bottom += a10
        values = (bottom - top)[None, :, :] * fy[:, None, :]
        values += top
        hit = (values >= per_map.take(found)).reshape(th * tw, len(tiles))
        if shape.inside is not None:  # tiles smaller than the group's shape: no padding
            hit &= shape.inside.take(cell, axis=1)
        first = place(found, cells.origin.take(cell))  # each tile's top-left pixel
        return np.compress(hit.reshape(-1), first + shape.offsets[:, None])


class _Placement:
    """Flat indices into a ``[N, units, H, W]`` mask of entries of ``[N, U, H, W]``
    maps whose units sit at ``offset .. offset + U - 1``; int32 where they fit."""

    def __init__(self, n: int, maps_units: int, units: int, offset: int, pixels: int) -> None:
        self.u = maps_units
        self.extra = units - maps_units
        self.offset = offset
        self.pixels = pixels
        self.dtype = np.dtype(np.int32 if n * units * pixels < 2**31 else np.int64)

    def __call__(self, found: np.ndarray, pixel: np.ndarray) -> np.ndarray:
        """Entries at ``pixel`` of maps ``found`` (``image * U + unit``), flat."""
        if self.extra or self.offset:
            found = found + (found // self.u) * self.extra + self.offset
        return (found * self.pixels + pixel).astype(self.dtype, copy=False)


def _split(index: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``divmod(index, size)``, as one division (numpy's divmod is several times slower)."""
    quotient = index // size
    return quotient, index - quotient * size


def _sparse_flatnonzero(mask: np.ndarray) -> np.ndarray:
    """``np.flatnonzero(mask)`` of a sparse bool array, about twice as fast.

    Scans 8 bools at a time as one uint64 word, then only the nonzero words.
    """
    flat = mask.reshape(-1)
    whole = len(flat) // 8 * 8
    words = flat[:whole].view(np.uint64)
    nonzero = np.flatnonzero(words != 0)
    within = np.flatnonzero(words.take(nonzero).view(np.bool_))
    found = nonzero.take(within >> 3) * 8 + (within & 7)
    if whole == len(flat):
        return found
    return np.concatenate([found, whole + np.flatnonzero(flat[whole:])])


class _TileShape:
    """A group of tiles evaluated together, as ``[height * width, tiles]`` arrays.

    ``r``/``c``: each position's row and column in the tile; ``offsets``: its flat
    label-pixel offset ``r * W + c`` (int32) from the tile's top-left. A ``ragged``
    group holds smaller tiles too, padded to this shape: ``inside`` ``[position,
    cell]`` then says which positions the tile of each cell of the map holds (None
    for a group of one tile size).
    """

    def __init__(self, height: int, width: int, label_width: int) -> None:
        self.height = height
        self.width = width
        self.size = height * width
        self.r = np.repeat(np.arange(height), width)
        self.c = np.tile(np.arange(width), height)
        self.offsets = (self.r * label_width + self.c).astype(np.int32)
        self.inside: np.ndarray | None = None

    @property
    def ragged(self) -> bool:
        """Whether the group pads smaller tiles to its shape."""
        return self.inside is not None


class _CellTable:
    """Per cell of a ``[h, w]`` map, what its tile needs, tabulated once.

    ``row``/``col``: the cell's position; ``right``/``down``: flat offsets to the
    tile's other support cells (0 in the last column / row); ``origin``: the flat
    label pixel (``y * W + x``) at the tile's top-left; ``group``: which of
    ``groups`` evaluates the tile, -1 for tiles holding no pixel. Group 0 holds the
    tiles of the most common size (the interior), exactly; group 1 all others
    (edges, a few percent), padded to their largest size: two evaluations instead of
    one per tile size, with little padding.
    """

    def __init__(self, ay: _AxisTiles, ax: _AxisTiles, label_width: int) -> None:
        h, w = len(ay.start), len(ax.start)
        self.count = h * w
        self.width = w
        self.row = np.repeat(np.arange(h), w)
        self.col = np.tile(np.arange(w), h)
        self.right = (ax.hi - np.arange(w))[self.col]
        self.down = ((ay.hi - np.arange(h)) * w)[self.row]
        self.origin = (ay.start * label_width)[self.row] + ax.start[self.col]
        th, tw = ay.length[self.row], ax.length[self.col]
        self.group = np.full(self.count, -1, dtype=np.int64)
        self.groups: list[_TileShape] = []
        size = th * (int(tw.max()) + 1) + tw  # one number per tile size
        filled = (th > 0) & (tw > 0)
        if not filled.any():
            return
        main = filled & (size == np.bincount(size[filled]).argmax())
        for members in (main, filled & ~main):
            if members.any():
                self.group[members] = len(self.groups)
                shape = _TileShape(int(th[members].max()), int(tw[members].max()), label_width)
                if self.groups:  # padded: mark the positions each tile holds
                    shape.inside = (shape.r[:, None] < th) & (shape.c[:, None] < tw)
                self.groups.append(shape)

    def candidates(self, hot: np.ndarray, maps: int) -> list[tuple[int, np.ndarray]]:
        """The tiles next to the ``hot`` cells (flat indices over ``maps`` maps), each
        once, by group: ``[(group, sorted flat int64 tile indices)]``.

        Tile ``(i, j)`` has support cells ``i..i+1 x j..j+1`` (clamped), so a hot cell
        makes candidates of its own tile and of those above, left and above-left.
        One sort (by group, then index) removes the repeats and splits the groups.
        """
        _, cell = _split(hot, self.count)
        up, left = self.row.take(cell) > 0, self.col.take(cell) > 0
        w = self.width
        shifts = ((None, 0), (up, w), (left, 1), (up & left, w + 1))
        tiles = np.concatenate([hot if m is None else hot[m] - s for m, s in shifts])
        cell = np.concatenate([cell if m is None else cell[m] - s for m, s in shifts])
        group = self.group.take(cell)
        total = maps * self.count
        if group.min(initial=0) < 0:
            keep = group >= 0
            tiles, group = tiles[keep], group[keep]
        key = tiles + group * total if len(self.groups) > 1 else tiles
        if len(self.groups) * total < 2**31:
            key = key.astype(np.int32)  # sorts twice as fast
        key.sort()
        unique = np.ones(len(key), dtype=bool)
        np.not_equal(key[1:], key[:-1], out=unique[1:])
        key = key[unique].astype(np.int64)
        bounds = np.searchsorted(key, np.arange(len(self.groups) + 1) * total)
        return [
            (k, key[lo:hi] - k * total)
            for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
            if hi > lo
        ]


class _AxisTiles:
    """Along one axis: where each cell's tile of label pixels starts, and its length.

    Tile ``i`` holds the pixels ``start[i] .. start[i] + length[i] - 1``, those whose
    lower support cell is ``i``; ``hi[i]`` is their upper cell and ``frac`` the upper
    cell's weight per pixel (also tabulated per tile by :meth:`fractions`).
    """

    def __init__(self, lo: np.ndarray, hi: np.ndarray, frac: np.ndarray, n_cells: int):
        cells = np.arange(n_cells)
        self.start = np.searchsorted(lo, cells, side="left")
        self.length = np.searchsorted(lo, cells, side="right") - self.start
        self.hi = np.minimum(cells + 1, n_cells - 1)
        self.frac = frac
        index = np.arange(max(1, int(self.length.max())))[:, None] + self.start
        self._table = frac[np.minimum(index, len(frac) - 1)]  # [pixel of its tile, cell]
        self._typed: dict[np.dtype, np.ndarray] = {}
        self._shared: dict[int, int] = {}  # length -> a cell whose weights all tiles share
        for length in np.unique(self.length[self.length > 0]).tolist():
            same = np.flatnonzero(self.length == length)
            columns = self._table[:length, same]
            if (columns == columns[:, :1]).all():
                self._shared[length] = int(same[0])

    def fractions(self, dtype: np.dtype) -> np.ndarray:
        """``[r, cell]``: the upper cell's weight at pixel ``r`` of the cell's tile (padded)."""
        dtype = np.dtype(dtype)
        if dtype not in self._typed:
            self._typed[dtype] = self._table.astype(dtype)
        return self._typed[dtype]

    def weights(self, length: int, cells: np.ndarray, dtype: np.dtype, ragged: bool) -> np.ndarray:
        """``[length, len(cells)]``: :meth:`fractions` of the tiles of ``cells``.

        When these tiles are all ``length`` long (not ``ragged``) and every tile of
        that length has the same weights (a whole stride), one shared ``[length,
        1]`` column instead: nothing to gather.
        """
        table = self.fractions(dtype)[:length]
        shared = None if ragged else self._shared.get(length)
        if shared is not None:
            return table[:, shared : shared + 1]
        return table.take(cells, axis=1)


def grid_upsample(
    maps: torch.Tensor, size: tuple[int, int], input_size: tuple[int, int], geometry: Geometry
) -> torch.Tensor:
    """Reference implementation of :func:`upsample` with ``grid_sample`` (slower)."""
    h, w = maps.shape[-2:]
    coords = []
    for n_label, n_input, n_cells, stride, offset in zip(
        size, input_size, (h, w), geometry.stride, geometry.offset, strict=True
    ):
        centre = torch.arange(n_label, device=maps.device, dtype=torch.float32) + 0.5
        centre = centre * (n_input / n_label) - 0.5
        cell = (centre - offset) / stride
        coords.append(cell.clamp(0, n_cells - 1) / max(n_cells - 1, 1) * 2 - 1)
    gy, gx = torch.meshgrid(coords[0], coords[1], indexing="ij")
    grid = torch.stack((gx, gy), dim=-1).expand(maps.shape[0], -1, -1, -1)
    return F.grid_sample(
        maps.float(), grid.to(maps.device), mode="bilinear", align_corners=True
    ).to(maps.dtype)
