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
    Runs in numpy (CPU).
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
        ay, ax = self.axes
        h, w = self.feature_size
        # per cell of a map: may the tile there take in the cell below / to the right
        # (not the last row / column), and does the tile hold any pixel
        self._down = np.repeat(np.arange(h) < h - 1, w)
        self._right = np.tile(np.arange(w) < w - 1, h)
        self._filled = (ay.length[:, None] > 0) & (ax.length[None, :] > 0)
        self._patterns: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def on(
        self, maps: np.ndarray, threshold: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(image, unit, pixel)`` int64 arrays of the entries of ``[N, U, H, W]`` that
        are on, for ``maps`` ``[N, U, h, w]`` (float) and ``threshold`` ``[U]``.

        ``pixel`` is ``y * W + x`` at the label size; each entry appears once.
        """
        n, u, h, w = maps.shape
        if (h, w) != self.feature_size or threshold.shape != (u,):
            raise ValueError(
                f"ThresholdedUpsample for {self.feature_size} maps got maps of shape "
                f"{maps.shape} and thresholds of shape {threshold.shape}"
            )
        dtype = np.result_type(maps.dtype, np.float32)
        maps = np.ascontiguousarray(maps, dtype=dtype)
        thr = threshold.astype(dtype)
        hot = (maps >= thr[None, :, None, None]).reshape(-1)
        if self.identity:
            image_unit, pixel = np.divmod(np.flatnonzero(hot), h * w)
            image, unit = np.divmod(image_unit, u)
            return image, unit, pixel
        down, right, filled = self._pattern(n * u)
        near = hot.copy()  # tile (i, j) has support cells i..hi(i) x j..hi(j)
        near[:-w] |= hot[w:] & down
        wide = near.copy()
        wide[:-1] |= near[1:] & right
        wide &= filled
        base = np.flatnonzero(wide)
        if len(base) == 0:
            return base, base.copy(), base.copy()
        image_unit, cell = np.divmod(base, h * w)
        image, unit = np.divmod(image_unit, u)
        i, j = np.divmod(cell, w)
        ay, ax = self.axes
        flat = maps.reshape(-1)
        dy, dx = (ay.hi[i] - i) * w, ax.hi[j] - j
        corners = (flat[base], flat[base + dx], flat[base + dy], flat[base + dy + dx])
        found = []
        for group in _tile_groups(ay.length[i], ax.length[j]):
            found.append(self._evaluate(group, i, j, corners, thr[unit[group]], dtype))
        tile, y, x = (np.concatenate(parts) for parts in zip(*found, strict=True))
        return image[tile], unit[tile], y * self.size[1] + x

    def _pattern(self, maps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Flat per-cell masks (see ``__init__``) repeated over ``maps`` maps, cached."""
        if maps not in self._patterns:
            cells = self.feature_size[0] * self.feature_size[1]
            down = np.tile(self._down, maps)[: maps * cells - self.feature_size[1]]
            right = np.tile(self._right, maps)[:-1]
            self._patterns = {maps: (down, right, np.tile(self._filled.reshape(-1), maps))}
        return self._patterns[maps]

    def _evaluate(self, group, i, j, corners, thr, dtype):
        """The on pixels of tiles ``group`` (all of one size): tile index, y, x."""
        ay, ax = self.axes
        ti, tj = i[group], j[group]
        th, tw = int(ay.length[ti[0]]), int(ax.length[tj[0]])
        a00, a01, a10, a11 = (c[group] for c in corners)
        fy = ay.fractions(dtype)[ti, :th]
        fx = ax.fractions(dtype)[tj, :tw]
        top = a00[:, None] + (a01 - a00)[:, None] * fx
        bottom = a10[:, None] + (a11 - a10)[:, None] * fx
        values = (bottom - top)[:, None, :] * fy[:, :, None]
        values += top[:, None, :]
        hit = np.flatnonzero(values >= thr[:, None, None])
        tile, rc = np.divmod(hit, th * tw)
        r, c = np.divmod(rc, tw)
        return group[tile], ay.start[ti[tile]] + r, ax.start[tj[tile]] + c


def _tile_groups(heights: np.ndarray, widths: np.ndarray) -> list[np.ndarray]:
    """Indices of the tiles grouped by (height, width): few sizes, so no padding."""
    key = heights * (int(widths.max()) + 1) + widths
    return [np.flatnonzero(key == k) for k in np.unique(key)]


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
        index = self.start[:, None] + np.arange(max(1, int(self.length.max())))
        self._table = frac[np.minimum(index, len(frac) - 1)]  # [cell, pixel of its tile]
        self._typed: dict[np.dtype, np.ndarray] = {}

    def fractions(self, dtype: np.dtype) -> np.ndarray:
        """``[cell, r]``: the upper cell's weight at pixel ``r`` of the cell's tile (padded)."""
        dtype = np.dtype(dtype)
        if dtype not in self._typed:
            self._typed[dtype] = self._table.astype(dtype)
        return self._typed[dtype]


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
