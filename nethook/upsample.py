"""Upsampling activation maps to label resolution, anchored at receptive-field centres.

A conv feature map is a grid of samples; cell ``(i, j)`` of a layer sits at the
centre of its receptive field in the input image, at input pixel coordinates
``offset + stride * (i, j)`` (pixel centres at integers). :class:`Geometry` holds that
stride and offset; :func:`upsample` evaluates the bilinear interpolation of the grid
at the centre of every label pixel (clamped at the border), so a unit's mask lines
up with the image the way the network actually sees it (thesis §3.2).

Where the geometry is not known, :meth:`Geometry.uniform` spreads the cells evenly
over the image (``align_corners=False`` bilinear resizing).
:func:`infer_geometry` derives it exactly for chains of convolutions and poolings
(``nn.Sequential`` models such as AlexNet, VGG or the demo CNN).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    centre = (torch.arange(n_label, dtype=torch.float64) + 0.5) * (n_input / n_label) - 0.5
    cell = ((centre - offset) / stride).clamp(0, n_cells - 1)
    lo = cell.floor().long().clamp(max=n_cells - 1)
    hi = (lo + 1).clamp(max=n_cells - 1)
    frac = cell - lo
    m = torch.zeros(n_label, n_cells, dtype=torch.float64)
    rows = torch.arange(n_label)
    m.index_put_((rows, lo), 1 - frac, accumulate=True)
    m.index_put_((rows, hi), frac, accumulate=True)
    return m.to(device=device, dtype=torch.float32)


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
