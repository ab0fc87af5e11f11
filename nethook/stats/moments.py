"""Mean, variance, covariance, cross-covariance and second moment, streamed.

All five use Chan et al.'s parallel update: each batch is centred (on the running
mean, or on its own mean when the data jumped), its centred product runs in the
compute dtype (a float32 GEMM by default), and the running count, mean and centred
sums are kept in float64 and combined with

    M = M_a + M_b + (mean_b - mean_a)(mean_b - mean_a)^T * n_a n_b / n.

Centring first is what keeps float32 data accurate: the product never sees the
offset, so a mean of 1e4 costs nothing (relative error ~1e-7 instead of the ~1 of a
naive ``E[xx^T] - mu mu^T`` in float32). Pass ``dtype=torch.float64`` to run the
products in float64 (relative error ~1e-14). Inputs are ``[N, C]`` (see
``nethook.stats.flatten``); results are float64 tensors on the stat's device, and
``to_xarray()`` gives them with named dims.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
import xarray as xr

from nethook.stats.base import Stat, as_tensor, check_batch, to_numpy, xr_units

_DTYPES = {"auto": None, "float32": torch.float32, "float64": torch.float64}


def _dtype_name(dtype: torch.dtype | None) -> str:
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"dtype must be None, torch.float32 or torch.float64, got {dtype}")


def _compute_dtype(option: torch.dtype | None, data: torch.dtype) -> torch.dtype:
    """The dtype a batch is centred and multiplied in."""
    if option is not None:
        return option
    return torch.float64 if data == torch.float64 else torch.float32


@contextlib.contextmanager
def _ieee_matmul(device: torch.device) -> Iterator[None]:
    """Keep TF32 off for the duration (it would silently cost ~1e-3 accuracy on CUDA)."""
    if device.type != "cuda":
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


_FLOAT64_BELOW = 32
"""Products with fewer channels than this run in float64: they are memory-bound, so it
costs nothing, and BLAS computes them as long float32 dot products (error ~1e-6)."""

_ROWS_PER_PRODUCT = 8192
"""Longest float32 accumulation of one product; longer batches are split and the
partial products summed in float64."""


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out += a.T @ b`` for centred ``[N, Ca]``, ``[N, Cb]`` into float64 ``out``."""
    if min(a.shape[1], b.shape[1]) < _FLOAT64_BELOW:
        out.addmm_(a.T.double(), b.double())
        return
    for start in range(0, a.shape[0], _ROWS_PER_PRODUCT):
        stop = start + _ROWS_PER_PRODUCT
        out += (a[start:stop].T @ b[start:stop]).double()  # a mixed-dtype add_ is slower


class _Batch(NamedTuple):
    """One centred batch: size, mean (relative to the stat's origin), centred data, and
    the residual mean of the centred data (float64)."""

    n: int
    mean: torch.Tensor
    centred: torch.Tensor
    residual: torch.Tensor


def _chan_weight(n_a: int, n_b: int) -> float:
    """The weight ``n_a n_b / n`` of the mean-difference term in Chan's merge."""
    return n_a * n_b / (n_a + n_b)


class _Moments(Stat):
    """Count and mean of ``[N, C]`` data; subclasses add centred sums.

    Means are kept relative to an ``origin`` (the first batch's mean), so that mean
    differences in Chan's merge do not lose digits to a large common offset: at an
    offset of 1e4 a float64 mean carries only ~1e-12 absolute precision.
    """

    _state_names: ClassVar[tuple[str, ...]] = ("origin", "mean")

    def __init__(self, dtype: torch.dtype | None = None):
        _dtype_name(dtype)
        self.dtype = dtype
        self.channels: int | None = None
        self.count = 0
        self._device: torch.device | None = None
        self._origin: torch.Tensor | None = None
        self._mean: torch.Tensor | None = None

    @property
    def device(self) -> torch.device | None:
        """The device the state lives on (``None`` until the first batch or ``to``)."""
        return self._device

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = check_batch(x, self.channels, type(self).__name__)
        if self._mean is None:
            self.channels = x.shape[1]
            self._device = x.device
            self._init_state(x.shape[1])
        elif x.device != self._device:
            self.to(x.device)
        return x

    def _init_state(self, channels: int) -> None:
        self._origin = torch.zeros(channels, dtype=torch.float64, device=self._device)
        self._mean = torch.zeros(channels, dtype=torch.float64, device=self._device)

    def _centre(self, x: torch.Tensor) -> _Batch:
        """Centre a non-empty batch in the compute dtype, without a float64 pass.

        The shift is the running mean (the batch's own mean for the first batch),
        rounded to the compute dtype. The residual, the mean of the centred values
        (small, so accurately summed in that dtype), corrects both the batch mean and
        the centred products. Where the residual is not small against the running
        spread (the data moved by more than a standard deviation), the batch is
        centred once more on its own mean, so cancellation never costs more than a
        factor of 2 in accuracy. Reusing the running mean saves a pass over the data.
        """
        n = x.shape[0]
        x = x.to(_compute_dtype(self.dtype, x.dtype))
        first = self.count == 0
        shift = x.mean(0) if first else (self._origin + self._mean).to(x.dtype)
        centred = x - shift
        residual = centred.sum(0).double() / n
        spread = None if first else self._spread()
        if spread is not None and bool((residual.square() > spread).any()):
            fix = residual.to(x.dtype)
            centred -= fix
            shift = shift.double() + fix.double()
            residual = centred.sum(0).double() / n
        if first:
            self._origin = shift.double()
        return _Batch(n, (shift.double() - self._origin) + residual, centred, residual)

    def _spread(self) -> torch.Tensor | None:
        """Per-channel running variance (biased) that bounds a safe residual (``None``:
        no products, any residual is safe)."""
        return None

    def _relative_mean(self, other: _Moments) -> torch.Tensor:
        """``other``'s mean expressed relative to this stat's origin, on its device."""
        origin = other._origin.to(self._device)
        return (origin - self._origin) + other._mean.to(self._device)

    def update(self, x: torch.Tensor) -> None:
        """Add a batch ``x`` of shape ``[N, C]``."""
        x = self._prepare(x)
        if x.shape[0] == 0:
            return
        with _ieee_matmul(x.device):
            self._absorb(self._centre(x))

    def _absorb(self, batch: _Batch) -> None:
        """Chan-merge a centred batch into the running sums."""
        delta = batch.mean - self._mean
        self._add_sums(batch, delta, _chan_weight(self.count, batch.n))
        self._mean += delta * (batch.n / (self.count + batch.n))
        self.count += batch.n

    def _add_sums(self, batch: _Batch, delta: torch.Tensor, weight: float) -> None:
        """Add the batch's centred sums and the mean-difference term (subclasses)."""

    def merge(self, other: _Moments) -> None:
        """Fold ``other`` into this stat (same kind and channel count)."""
        self._check_merge(other, "channels")
        if other._mean is None or other.count == 0:
            if self._mean is None and other._mean is not None:
                self.channels, self._device = other.channels, other._device
                self._init_state(other.channels)
            return
        if self._mean is None:
            self.channels, self._device = other.channels, other._device
            self._init_state(other.channels)
        if self.count == 0:
            self._origin = other._origin.to(self._device).clone()
        delta = self._relative_mean(other) - self._mean
        self._merge_sums(other, delta, _chan_weight(self.count, other.count))
        self._mean += delta * (other.count / (self.count + other.count))
        self.count += other.count

    def _merge_sums(self, other: _Moments, delta: torch.Tensor, weight: float) -> None:
        """Add ``other``'s centred sums and the mean-difference term (subclasses)."""

    def _require(self) -> None:
        if self._mean is None:
            raise ValueError(f"{type(self).__name__} has seen no data yet")

    def mean(self) -> torch.Tensor:
        """Per-channel mean ``[C]`` (float64; NaN before any sample)."""
        self._require()
        if self.count == 0:
            return torch.full_like(self._mean, float("nan"))
        return self._origin + self._mean

    def _tensors(self) -> dict[str, torch.Tensor | None]:
        return {name: getattr(self, "_" + name, None) for name in self._state_names}

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state: count, dtype option, float64 ``origin``, ``mean`` (relative
        to the origin) and centred sums."""
        sd = {**self._header(), "dtype": _dtype_name(self.dtype), "count": int(self.count)}
        for name, t in self._tensors().items():
            sd[name] = np.zeros((0,), np.float64) if t is None else to_numpy(t)
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`."""
        self._check_header(sd)
        device = getattr(self, "_device", None)
        _Moments.__init__(self, _DTYPES[str(np.asarray(sd["dtype"]))])
        self._device = device
        self.count = int(np.asarray(sd["count"]))
        mean = np.asarray(sd["mean"])
        if mean.shape == (0,) and self.count == 0:
            return
        self.channels = mean.shape[0]
        self._init_state(self.channels)
        for name in self._tensors():
            setattr(self, "_" + name, as_tensor(sd[name], self._device))

    def to(self, device: torch.device | str) -> _Moments:
        """Move the state to ``device``."""
        self._device = torch.device(device)
        for name, t in self._tensors().items():
            if t is not None:
                setattr(self, "_" + name, t.to(self._device))
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(channels={self.channels}, count={self.count})"


class Mean(_Moments):
    """Per-channel mean of ``[N, C]`` data.

    Absolute error ~1e-7 of a standard deviation at any offset on the float32 path;
    ~1e-16 relative with ``dtype=torch.float64``.
    """

    def to_xarray(self, units: Sequence | None = None) -> xr.Dataset:
        """``mean`` over dim ``unit``; attr ``count``."""
        coords = xr_units(units, self.channels or 0)
        return xr.Dataset(
            {"mean": ("unit", to_numpy(self.mean()))}, coords=coords, attrs={"count": self.count}
        )


class Variance(_Moments):
    """Per-channel mean and variance of ``[N, C]`` data (Chan's update, float64 sums)."""

    _state_names = ("origin", "mean", "m2")

    def _init_state(self, channels: int) -> None:
        super()._init_state(channels)
        self._m2 = torch.zeros(channels, dtype=torch.float64, device=self._device)

    def _add_sums(self, batch: _Batch, delta: torch.Tensor, weight: float) -> None:
        squares = batch.centred.square().sum(0).double()  # torch sums by cascade: ~1e-7
        self._m2 += squares - batch.n * batch.residual.square()
        self._m2 += delta.square() * weight

    def _spread(self) -> torch.Tensor:
        return self._m2 / self.count

    def _merge_sums(self, other: Variance, delta: torch.Tensor, weight: float) -> None:
        self._m2 += other._m2.to(self._device)
        self._m2 += delta.square() * weight

    def variance(self, unbiased: bool = True) -> torch.Tensor:
        """Per-channel variance ``[C]``; ``unbiased`` divides by ``N - 1`` (like torch)."""
        self._require()
        return self._m2 / (self.count - 1 if unbiased else self.count)

    def std(self, unbiased: bool = True) -> torch.Tensor:
        """Per-channel standard deviation ``[C]``."""
        return self.variance(unbiased).sqrt()

    def to_xarray(self, units: Sequence | None = None) -> xr.Dataset:
        """``mean`` and ``variance`` over dim ``unit``; attr ``count``."""
        coords = xr_units(units, self.channels or 0)
        data = {"mean": self.mean(), "variance": self.variance()}
        return xr.Dataset(
            {k: ("unit", to_numpy(v)) for k, v in data.items()},
            coords=coords,
            attrs={"count": self.count},
        )


class Covariance(_Moments):
    """Mean and full ``[C, C]`` covariance of ``[N, C]`` data.

    Each batch costs one ``[C, N] @ [N, C]`` product in the compute dtype; running
    sums are float64. Relative (Frobenius) error against an exact float64
    computation: ~1e-7 for float32 data at any mean offset (tested <= 1e-6 at offset
    1e4 and under a drifting mean), ~1e-14 with ``dtype=torch.float64`` (tested
    <= 1e-12).
    """

    _state_names = ("origin", "mean", "m2")

    def _init_state(self, channels: int) -> None:
        super()._init_state(channels)
        self._m2 = torch.zeros(channels, channels, dtype=torch.float64, device=self._device)

    def _add_sums(self, batch: _Batch, delta: torch.Tensor, weight: float) -> None:
        _add_product(self._m2, batch.centred, batch.centred)
        terms = torch.stack([batch.residual * -batch.n, delta * weight], 1)
        self._m2.addmm_(terms, torch.stack([batch.residual, delta], 0))

    def _spread(self) -> torch.Tensor:
        return self._m2.diagonal() / self.count

    def _merge_sums(self, other: Covariance, delta: torch.Tensor, weight: float) -> None:
        self._m2 += other._m2.to(self._device)
        self._m2.addr_(delta, delta, alpha=weight)

    def covariance(self, unbiased: bool = True) -> torch.Tensor:
        """Covariance matrix ``[C, C]``; ``unbiased`` divides by ``N - 1`` (like ``np.cov``)."""
        self._require()
        return self._m2 / (self.count - 1 if unbiased else self.count)

    def variance(self, unbiased: bool = True) -> torch.Tensor:
        """Per-channel variance ``[C]`` (the diagonal of :meth:`covariance`)."""
        return self.covariance(unbiased).diagonal().clone()

    def std(self, unbiased: bool = True) -> torch.Tensor:
        """Per-channel standard deviation ``[C]``."""
        return self.variance(unbiased).sqrt()

    def correlation(self) -> torch.Tensor:
        """Pearson correlation ``[C, C]`` (NaN where a channel is constant)."""
        self._require()
        scale = self._m2.diagonal().sqrt()
        return self._m2 / torch.outer(scale, scale)

    def moment(self) -> torch.Tensor:
        """Uncentred second moment ``E[x x^T]`` ``[C, C]``, from the centred sums."""
        self._require()
        mean = self.mean()
        return self._m2 / self.count + torch.outer(mean, mean)

    def to_xarray(self, units: Sequence | None = None) -> xr.Dataset:
        """``mean``, ``variance`` (dim ``unit``) and ``covariance`` (``unit``, ``unit2``)."""
        coords = {
            **xr_units(units, self.channels or 0),
            **xr_units(units, self.channels or 0, "unit2"),
        }
        return xr.Dataset(
            {
                "mean": ("unit", to_numpy(self.mean())),
                "variance": ("unit", to_numpy(self.variance())),
                "covariance": (("unit", "unit2"), to_numpy(self.covariance())),
            },
            coords=coords,
            attrs={"count": self.count},
        )


class SecondMoment(Covariance):
    """Uncentred second moment ``E[x x^T]`` (the ``C`` a rank-one rewrite needs).

    Accumulated exactly like :class:`Covariance` (centred, so equally accurate);
    :meth:`moment` adds back ``mu mu^T`` in float64 at readout.
    """

    def to_xarray(self, units: Sequence | None = None) -> xr.Dataset:
        """``mean`` (dim ``unit``) and ``moment`` (``unit``, ``unit2``)."""
        coords = {
            **xr_units(units, self.channels or 0),
            **xr_units(units, self.channels or 0, "unit2"),
        }
        return xr.Dataset(
            {
                "mean": ("unit", to_numpy(self.mean())),
                "moment": (("unit", "unit2"), to_numpy(self.moment())),
            },
            coords=coords,
            attrs={"count": self.count},
        )


class CrossCovariance(Stat):
    """Covariance of ``x [N, Cx]`` against ``y [N, Cy]``: ``[Cx, Cy]``.

    Same Chan update and accuracy as :class:`Covariance`; also keeps each side's
    variance so :meth:`correlation` is available. ``update(x, y)`` takes paired rows.
    """

    def __init__(self, dtype: torch.dtype | None = None):
        self._x = Variance(dtype)
        self._y = Variance(dtype)
        self._m2: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype | None:
        """The compute dtype option (``None``: float32 unless the data are float64)."""
        return self._x.dtype

    @property
    def count(self) -> int:
        """Number of sample pairs seen."""
        return self._x.count

    @property
    def channels(self) -> tuple[int, int] | None:
        """``(Cx, Cy)``, or ``None`` before the first batch."""
        return None if self._m2 is None else (self._x.channels, self._y.channels)

    @property
    def device(self) -> torch.device | None:
        """The device the state lives on."""
        return self._x.device

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add paired batches ``x [N, Cx]`` and ``y [N, Cy]``."""
        name = type(self).__name__
        x = check_batch(x, self._x.channels, name)
        y = check_batch(y, self._y.channels, name + " (y)")
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"{name}.update expects paired rows, got {x.shape[0]} x rows and {y.shape[0]} y rows"
            )
        if y.device != x.device:
            raise ValueError(f"{name}.update: x is on {x.device} but y is on {y.device}")
        x, y = self._x._prepare(x), self._y._prepare(y)
        if self._m2 is None:
            self._m2 = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64, device=x.device)
        elif self._m2.device != x.device:
            self._m2 = self._m2.to(x.device)
        if x.shape[0] == 0:
            return
        if self.dtype is None and torch.float64 in (x.dtype, y.dtype):
            x, y = x.double(), y.double()
        with _ieee_matmul(x.device):
            bx, by = self._x._centre(x), self._y._centre(y)
            _add_product(self._m2, bx.centred, by.centred)
            self._m2.addr_(bx.residual, by.residual, alpha=-bx.n)
            dx, dy = bx.mean - self._x._mean, by.mean - self._y._mean
            self._m2.addr_(dx, dy, alpha=_chan_weight(self.count, bx.n))
            self._x._absorb(bx)
            self._y._absorb(by)

    def merge(self, other: CrossCovariance) -> None:
        """Fold ``other`` into this stat (same kind and channel counts)."""
        self._check_merge(other, "channels")
        if other._m2 is None:
            return
        if self._m2 is None or self.count == 0:
            self.load_state_dict({**other.state_dict(), "dtype": _dtype_name(self.dtype)})
            self.to(other.device)
            return
        if other.count == 0:
            return
        device = self._m2.device
        dx = self._x._relative_mean(other._x) - self._x._mean
        dy = self._y._relative_mean(other._y) - self._y._mean
        self._m2 += other._m2.to(device)
        self._m2.addr_(dx, dy, alpha=_chan_weight(self.count, other.count))
        self._x.merge(other._x)
        self._y.merge(other._y)

    def _require(self) -> None:
        if self._m2 is None:
            raise ValueError(f"{type(self).__name__} has seen no data yet")

    def mean(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel means ``([Cx], [Cy])``."""
        self._require()
        return self._x.mean(), self._y.mean()

    def variance(self, unbiased: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel variances ``([Cx], [Cy])``."""
        self._require()
        return self._x.variance(unbiased), self._y.variance(unbiased)

    def covariance(self, unbiased: bool = True) -> torch.Tensor:
        """Cross-covariance ``[Cx, Cy]``; ``unbiased`` divides by ``N - 1``."""
        self._require()
        return self._m2 / (self.count - 1 if unbiased else self.count)

    def correlation(self) -> torch.Tensor:
        """Pearson correlation of each x channel with each y channel ``[Cx, Cy]``."""
        self._require()
        return self._m2 / torch.outer(self._x._m2.sqrt(), self._y._m2.sqrt())

    def moment(self) -> torch.Tensor:
        """Uncentred ``E[x y^T]`` ``[Cx, Cy]``."""
        self._require()
        mx, my = self.mean()
        return self._m2 / self.count + torch.outer(mx, my)

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state: each side's moments and the float64 cross sums."""
        empty = self._m2 is None
        return {
            **self._header(),
            "dtype": _dtype_name(self.dtype),
            "x": self._x.state_dict(),
            "y": self._y.state_dict(),
            "m2": np.zeros((0, 0), np.float64) if empty else to_numpy(self._m2),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`."""
        self._check_header(sd)
        device = self.device if hasattr(self, "_x") else None
        dtype = _DTYPES[str(np.asarray(sd["dtype"]))]
        self._x, self._y = Variance(dtype), Variance(dtype)
        self._x._device = self._y._device = device
        self._x.load_state_dict(sd["x"])
        self._y.load_state_dict(sd["y"])
        m2 = np.asarray(sd["m2"])
        self._m2 = None if self._x.channels is None else as_tensor(m2, self._x.device)

    def to(self, device: torch.device | str) -> CrossCovariance:
        """Move the state to ``device``."""
        self._x.to(device)
        self._y.to(device)
        if self._m2 is not None:
            self._m2 = self._m2.to(device)
        return self

    def to_xarray(
        self, units_x: Sequence | None = None, units_y: Sequence | None = None
    ) -> xr.Dataset:
        """``mean_x`` (dim ``unit_x``), ``mean_y`` (``unit_y``), ``covariance`` and
        ``correlation`` (``unit_x``, ``unit_y``)."""
        cx, cy = self.channels or (0, 0)
        mx, my = self.mean()
        return xr.Dataset(
            {
                "mean_x": ("unit_x", to_numpy(mx)),
                "mean_y": ("unit_y", to_numpy(my)),
                "covariance": (("unit_x", "unit_y"), to_numpy(self.covariance())),
                "correlation": (("unit_x", "unit_y"), to_numpy(self.correlation())),
            },
            coords={**xr_units(units_x, cx, "unit_x"), **xr_units(units_y, cy, "unit_y")},
            attrs={"count": self.count},
        )

    def __repr__(self) -> str:
        return f"CrossCovariance(channels={self.channels}, count={self.count})"
