"""A vectorized painter: shapes filled with solid colors or textures, labels painted alongside.

Coordinates are normalized: y and x run over [0, 1] from the top-left corner, and a
pixel belongs to a shape when its centre does. Each paint call touches only the
pixels of the shape's bounding box, so a scene costs little more than its area.
Every painted pixel overwrites image, object, part, material and color labels
together (painter's algorithm), which keeps the labels pixel-exact by construction.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .concepts import COLOR_JITTER, PALETTE, color_id, material_id
from .rand import Rand

Shape = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""Inside-test of pixel centres: (y [r, 1], x [1, c]) -> bool [r, c]."""

OBJECT, PART, MATERIAL, COLOR = range(4)
"""Rows of :meth:`Canvas.labels`."""


def _frac(a: np.ndarray) -> np.ndarray:
    return a - np.floor(a)


def _pattern(material: str, y: np.ndarray, x: np.ndarray, period: float, angle: float):
    """Where the texture shows its second color (bool, broadcast of y [r,1] and x [1,c])."""
    if material == "brick":
        rows = y / period
        offset = 0.5 * (np.floor(rows) % 2)
        return (_frac(rows) < 0.18) | (_frac(x / (2 * period) + offset) < 0.09)
    if material == "wood":
        t = x * math.cos(angle) + y * math.sin(angle)
        return _frac(t / period + 0.35 * np.sin(2 * math.pi * y / (3 * period))) < 0.3
    if material == "stripes":
        return _frac((x * math.cos(angle) + y * math.sin(angle)) / period) < 0.5
    if material == "dots":
        return (_frac(x / period) - 0.5) ** 2 + (_frac(y / period) - 0.5) ** 2 < 0.09
    if material == "checker":
        return (np.floor(x / period) + np.floor(y / period)) % 2 == 1
    if material == "ripple":
        return _frac(y / period + 0.3 * np.sin(2 * math.pi * x / (2.5 * period))) < 0.3
    raise ValueError(f"unknown material {material!r}")


@dataclass(frozen=True)
class Paint:
    """A fill: one color term, or a material texture alternating two color terms."""

    rgb: tuple[float, float, float]
    color: str
    material: str | None = None
    rgb2: tuple[float, float, float] = (0.0, 0.0, 0.0)
    color2: str = "black"
    period: float = 0.05
    angle: float = 0.0

    def pattern(self, y: np.ndarray, x: np.ndarray) -> np.ndarray | None:
        """Second-color mask on the grid, or None for a plain fill."""
        if self.material is None:
            return None
        return _pattern(self.material, y, x, self.period, self.angle)


def pick_rgb(rng: Rand, term: str) -> tuple[float, float, float]:
    """A jittered palette color of the color term ``term``."""
    r, g, b = (
        min(1.0, max(0.0, v + rng.uniform(-COLOR_JITTER, COLOR_JITTER)))
        for v in rng.choice(PALETTE[term])
    )
    return (r, g, b)


def solid(rng: Rand, term: str) -> Paint:
    """A plain fill of color term ``term``."""
    return Paint(pick_rgb(rng, term), term)


def textured(rng: Rand, material: str, term: str, term2: str, period: float) -> Paint:
    """A ``material`` texture of ``term`` with ``term2`` as its second color."""
    angle = rng.uniform(0, math.pi) if material in ("stripes", "wood") else 0.0
    return Paint(pick_rgb(rng, term), term, material, pick_rgb(rng, term2), term2, period, angle)


def rect() -> Shape | None:
    """The whole bounding box (no extra mask)."""
    return None


def ellipse(cy: float, cx: float, ry: float, rx: float) -> Shape:
    """Filled ellipse centred at (cy, cx) with radii (ry, rx)."""
    return lambda y, x: ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def polygon(points: list[tuple[float, float]]) -> Shape:
    """Filled convex polygon; ``points`` are (y, x) vertices in either winding order."""
    cy = sum(p[0] for p in points) / len(points)
    cx = sum(p[1] for p in points) / len(points)
    edges = []
    for (y0, x0), (y1, x1) in zip(points, points[1:] + points[:1], strict=True):
        sign = 1.0 if (x1 - x0) * (cy - y0) - (y1 - y0) * (cx - x0) >= 0 else -1.0
        edges.append((y0, x0, y1 - y0, x1 - x0, sign))

    def inside(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        mask = np.ones(np.broadcast_shapes(y.shape, x.shape), dtype=bool)
        for y0, x0, dy, dx, sign in edges:
            mask &= sign * (dx * (y - y0) - dy * (x - x0)) >= 0
        return mask

    return inside


def bounds(points: list[tuple[float, float]]) -> tuple[float, float, float, float]:
    """Bounding box (y0, x0, y1, x1) of (y, x) points."""
    ys = [p[0] for p in points]
    xs = [p[1] for p in points]
    return (min(ys), min(xs), max(ys), max(xs))


class Canvas:
    """A scene being painted: each pixel holds the index of the fill that last covered it.

    Fills are recorded as (rgb, object, part, material, color) rows; :meth:`image`
    and :meth:`labels` look every pixel up in that table at the end, so a paint
    call writes one small integer plane however many label layers there are.
    """

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width
        self.fills = np.zeros((height, width), dtype=np.int32)
        self._rgb: list[tuple[float, float, float]] = [(0.0, 0.0, 0.0)]
        self._labels: list[tuple[int, int, int, int]] = [(0, 0, 0, 0)]
        self._ys = ((np.arange(height) + 0.5) / height)[:, None]
        self._xs = ((np.arange(width) + 0.5) / width)[None, :]

    @staticmethod
    def _span(lo: float, hi: float, n: int) -> slice:
        start = max(0, math.ceil(lo * n - 0.5))
        stop = min(n, math.ceil(hi * n - 0.5))
        return slice(start, max(start, stop))

    def _fill(self, rgb: tuple[float, float, float], labels: tuple[int, int, int, int]) -> int:
        self._rgb.append(rgb)
        self._labels.append(labels)
        return len(self._rgb) - 1

    def paint(
        self,
        box: tuple[float, float, float, float],
        paint: Paint,
        obj: int,
        part: int = 0,
        shape: Shape | None = None,
    ) -> None:
        """Fill ``shape`` (default: the whole box) within ``box`` = (y0, x0, y1, x1).

        Sets the image to the paint and the labels to object ``obj``, part ``part``
        (0: none), the paint's material and the color term actually drawn.
        """
        rows = self._span(box[0], box[2], self.height)
        cols = self._span(box[1], box[3], self.width)
        if rows.start == rows.stop or cols.start == cols.stop:
            return
        y, x = self._ys[rows], self._xs[:, cols]
        material = 0 if paint.material is None else material_id(paint.material)
        first = self._fill(paint.rgb, (obj, part, material, color_id(paint.color)))
        fills = self.fills[rows, cols]
        second = paint.pattern(y, x)
        if second is None:
            value: int | np.ndarray = first
        else:
            other = self._fill(paint.rgb2, (obj, part, material, color_id(paint.color2)))
            value = np.where(second, np.int32(other), np.int32(first))
        if shape is None:
            fills[...] = value
            return
        mask = shape(y, x)
        fills[mask] = value if second is None else value[mask]

    def present(self) -> np.ndarray:
        """Sorted concept ids (any category, without 0) visible somewhere on the canvas."""
        used = np.bincount(self.fills.ravel(), minlength=len(self._labels)) > 0
        ids = np.unique(np.asarray(self._labels, dtype=np.int64)[used])
        return ids[ids > 0]

    def image(self) -> np.ndarray:
        """The painted image, float32 ``[3, H, W]`` in [0, 1]."""
        return np.take(np.asarray(self._rgb, dtype=np.float32).T, self.fills, axis=1)

    def labels(self) -> np.ndarray:
        """Labels int64 ``[4, H, W]``: object, part, material and color concept ids."""
        return np.take(np.asarray(self._labels, dtype=np.int64).T, self.fills, axis=1)
