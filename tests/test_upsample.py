"""Upsampling geometry: receptive-field centres and bilinear resampling onto labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from nethook.upsample import (
    Geometry,
    ThresholdedUpsample,
    _sparse_flatnonzero,
    axis_weights,
    grid_upsample,
    infer_geometry,
    is_identity,
    upsample,
)


def test_uniform_geometry_is_plain_bilinear_resize() -> None:
    maps = torch.randn(2, 3, 5, 7)
    ref = F.interpolate(maps, size=(20, 28), mode="bilinear", align_corners=False)
    general = grid_upsample(maps, (20, 28), (40, 56), Geometry.uniform((40, 56), (5, 7)))
    torch.testing.assert_close(general, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(upsample(maps, (20, 28), (40, 56)), ref, atol=1e-5, rtol=1e-5)
    big = grid_upsample(maps, (80, 112), (40, 56), Geometry.uniform((40, 56), (5, 7)))
    torch.testing.assert_close(big, upsample(maps, (80, 112), (40, 56)), atol=1e-5, rtol=1e-5)
    same = upsample(maps, (5, 7), (5, 7))
    torch.testing.assert_close(same, maps, atol=1e-6, rtol=1e-6)


def test_cells_land_on_their_positions() -> None:
    """A map whose cells hold their own input y-position reads back each pixel's centre."""
    geo = Geometry(stride=(4.0, 4.0), offset=(3.0, 3.0))
    h = 8
    pos = 3.0 + 4.0 * torch.arange(h, dtype=torch.float32)
    maps = pos.view(1, 1, h, 1).expand(1, 1, h, h).contiguous()
    out = upsample(maps, (40, 40), (40, 40), geo)[0, 0, :, 0]
    centres = torch.arange(40, dtype=torch.float32)
    expected = centres.clamp(pos[0], pos[-1])
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def receptive_centre(model: nn.Module, size: int, cell: tuple[int, int]) -> tuple[float, float]:
    """Centroid of the input gradient of one output cell: a brute-force RF centre."""
    x = torch.zeros(1, 1, size, size, requires_grad=True)
    model(x)[0, 0, cell[0], cell[1]].backward()
    g = x.grad[0, 0].abs()
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return float((g * ys).sum() / g.sum()), float((g * xs).sum() / g.sum())


def test_infer_geometry_matches_receptive_fields() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 1, 5, stride=1, padding=2),
        nn.ReLU(),
        nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(1, 1, 3, stride=2, padding=0)),
        nn.AvgPool2d(3, stride=2, padding=1),
        nn.Conv2d(1, 1, 1),
    )
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.constant_(m.weight, 1.0)
            nn.init.zeros_(m.bias)
    # ReLU and max pooling pass gradients through evenly on a zero input with equal weights:
    # make the network linear so the gradient centroid is the receptive-field centre.
    linear = nn.Sequential(
        model[0],
        nn.Identity(),
        nn.Sequential(nn.AvgPool2d(2), model[2][1]),
        model[3],
        model[4],
    )
    geo = infer_geometry(model, "4")
    assert geo == infer_geometry(linear, "4")
    for cell in [(3, 4), (5, 5), (4, 6)]:
        cy, cx = receptive_centre(linear, 96, cell)
        assert abs(cy - (geo.offset[0] + geo.stride[0] * cell[0])) < 1e-4
        assert abs(cx - (geo.offset[1] + geo.stride[1] * cell[1])) < 1e-4
    assert infer_geometry(model, "2.0") == Geometry(stride=(2.0, 2.0), offset=(0.5, 0.5))


def test_infer_geometry_gives_up_on_unknown_modules() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x):
            return x + self.conv(x)

    model = nn.Sequential(Residual(), nn.Conv2d(1, 1, 3))
    assert infer_geometry(model, "1") is None
    assert infer_geometry(model, "0.conv") is None


def dense_on(maps: np.ndarray, thr: np.ndarray, size, input_size, geometry) -> np.ndarray:
    """Reference: every label pixel interpolated from its 2 x 2 cells by the same lerps
    (``a + (b - a) * f``, along x then y, in float32 or wider), so that values are the
    same floats."""
    h, w = maps.shape[-2:]
    dtype = np.result_type(maps.dtype, np.float32)
    maps, thr = maps.astype(dtype), thr.astype(dtype)
    (ly, hy, fy), (lx, hx, fx) = (
        axis_weights(n_label, n_input, n_cells, s, o)
        for n_label, n_input, n_cells, s, o in zip(
            size, input_size, (h, w), geometry.stride, geometry.offset, strict=True
        )
    )
    m = maps
    fy, fx = fy.astype(dtype), fx.astype(dtype)
    top = m[..., ly, :][..., lx] + (m[..., ly, :][..., hx] - m[..., ly, :][..., lx]) * fx
    bottom = m[..., hy, :][..., lx] + (m[..., hy, :][..., hx] - m[..., hy, :][..., lx]) * fx
    values = top + (bottom - top) * fy[:, None]
    return values >= thr[None, :, None, None]


geometries = st.one_of(
    st.just(None),
    st.builds(
        Geometry,
        stride=st.tuples(
            st.sampled_from([1.0, 2.0, 3.0, 4.0, 8.0]), st.sampled_from([1.0, 2.0, 5.0])
        ),
        offset=st.tuples(st.sampled_from([-1.0, 0.0, 0.5, 3.5]), st.sampled_from([0.0, 1.0, 7.5])),
    ),
)


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(0, 3),
    u=st.integers(1, 4),
    h=st.integers(1, 7),
    w=st.integers(1, 7),
    size=st.tuples(st.integers(1, 24), st.integers(1, 24)),
    input_scale=st.sampled_from([0.5, 1.0, 2.0]),
    geometry=geometries,
    levels=st.sampled_from([3, 1000]),
)
def test_thresholded_upsample_finds_every_on_pixel(
    seed, n, u, h, w, size, input_scale, geometry, levels
) -> None:
    """The tiles around hot cells hold every on pixel: equal to thresholding everything."""
    rng = np.random.default_rng(seed)
    maps = (rng.integers(0, levels, (n, u, h, w)) / levels).astype(np.float32)  # ties too
    thr = rng.choice(maps.reshape(-1), u) if maps.size else np.zeros(u, np.float32)
    input_size = tuple(max(1, round(s * input_scale)) for s in size)
    geo = geometry or Geometry.uniform(input_size, (h, w))
    image, unit, pixel = ThresholdedUpsample((h, w), size, input_size, geometry).on(maps, thr)
    got = np.zeros((n, u, *size), bool)
    got.reshape(n, u, size[0] * size[1])[image, unit, pixel] = True
    assert len(image) == got.sum()  # no entry twice
    expected = dense_on(maps, thr, size, input_size, geo)
    if is_identity((h, w), size, input_size, geo):
        expected = maps >= thr[None, :, None, None]
    np.testing.assert_array_equal(got, expected)
    # and it is upsample()'s mask, up to float32 rounding at the threshold
    dense = upsample(torch.from_numpy(maps), size, input_size, geometry).numpy()
    near = np.isclose(dense, thr[None, :, None, None], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[~near], (dense >= thr[None, :, None, None])[~near])


def test_thresholded_upsample_names_bad_shapes() -> None:
    up = ThresholdedUpsample((4, 4), (8, 8), (8, 8))
    with pytest.raises(ValueError, match=r"\(4, 4\) maps got maps of shape \(1, 2, 4, 5\)"):
        up.on(np.zeros((1, 2, 4, 5), np.float32), np.zeros(2, np.float32))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(0, 3),
    u=st.integers(1, 4),
    h=st.integers(1, 7),
    w=st.integers(1, 7),
    size=st.tuples(st.integers(1, 24), st.integers(1, 24)),
    geometry=geometries,
    before=st.integers(0, 3),
    after=st.integers(0, 3),
)
def test_flat_on_indexes_a_wider_mask(seed, n, u, h, w, size, geometry, before, after) -> None:
    """Units placed at ``offset`` of a ``units``-wide mask: exactly that mask's on entries."""
    rng = np.random.default_rng(seed)
    maps = (rng.integers(0, 4, (n, u, h, w)) / 4).astype(np.float32)
    thr = rng.choice(maps.reshape(-1), u) if maps.size else np.zeros(u, np.float32)
    geo = geometry or Geometry.uniform(size, (h, w))
    units = before + u + after
    found = ThresholdedUpsample((h, w), size, size, geometry).flat_on(
        maps, thr, units=units, offset=before
    )
    mask = np.zeros((n, units, *size), bool)
    own = dense_on(maps, thr, size, size, geo)
    if is_identity((h, w), size, size, geo):
        own = maps >= thr[None, :, None, None]
    mask[:, before : before + u] = own
    assert found.dtype == np.int32
    np.testing.assert_array_equal(np.sort(found), np.flatnonzero(mask))


def test_flat_on_regular_strides_and_edge_tiles() -> None:
    """The demo's geometry (8 x 8 cells at stride 8 onto 64 x 64): interior tiles share
    their weights, edge tiles (12 and 4 pixels) are padded; hot cells everywhere."""
    geo = Geometry(stride=(8.0, 8.0), offset=(3.5, 3.5))
    rng = np.random.default_rng(0)
    maps = rng.random((3, 5, 8, 8)).astype(np.float32)
    maps[:, :, [0, 7], :] *= 1.5  # the border rows and columns reach the threshold too
    maps[:, :, :, [0, 7]] *= 1.5
    thr = np.quantile(maps, 0.9, axis=(0, 2, 3)).astype(np.float32)
    up = ThresholdedUpsample((8, 8), (64, 64), (64, 64), geo)
    expected = dense_on(maps, thr, (64, 64), (64, 64), geo)
    assert expected[:, :, [0, 63], :].any() and expected[:, :, :, [0, 63]].any()
    np.testing.assert_array_equal(np.sort(up.flat_on(maps, thr)), np.flatnonzero(expected))


def test_flat_on_indices_are_int64_when_the_mask_is_too_large_for_int32() -> None:
    up = ThresholdedUpsample((2, 2), (4, 4), (4, 4))
    maps = np.zeros((2, 1, 2, 2), np.float32)
    maps[1, 0, 1, 1] = 1.0  # only the bottom-right label pixel of image 1 reaches 1.0
    units = 2**31 // 16 + 1
    found = up.flat_on(maps, np.ones(1, np.float32), units=units, offset=units - 1)
    assert found.dtype == np.int64
    assert found.tolist() == [((1 * units + units - 1) * 4 + 3) * 4 + 3]


def test_flat_on_names_units_that_do_not_fit() -> None:
    up = ThresholdedUpsample((2, 2), (4, 4), (4, 4))
    maps = np.zeros((1, 3, 2, 2), np.float32)
    with pytest.raises(ValueError, match=r"units 2\.\.4 of the maps do not fit a mask of 4 units"):
        up.flat_on(maps, np.zeros(3, np.float32), units=4, offset=2)


@settings(max_examples=60, deadline=None)
@given(
    length=st.integers(0, 200),
    density=st.sampled_from([0.0, 0.01, 0.3, 1.0]),
    seed=st.integers(0, 2**31),
)
def test_sparse_flatnonzero_is_flatnonzero(length, density, seed) -> None:
    mask = np.random.default_rng(seed).random(length) < density
    np.testing.assert_array_equal(_sparse_flatnonzero(mask), np.flatnonzero(mask))


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_flat_on_computes_in_the_maps_dtype_at_least_float32(dtype) -> None:
    geo = Geometry(stride=(3.0, 2.0), offset=(1.0, 0.5))
    rng = np.random.default_rng(1)
    maps = rng.random((2, 3, 5, 6)).astype(dtype)
    thr = np.quantile(maps, 0.8, axis=(0, 2, 3)).astype(dtype)
    up = ThresholdedUpsample((5, 6), (14, 11), (15, 12), geo)
    expected = dense_on(maps, thr, (14, 11), (15, 12), geo)
    np.testing.assert_array_equal(np.sort(up.flat_on(maps, thr)), np.flatnonzero(expected))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(0, 3),
    u=st.integers(1, 4),
    h=st.integers(1, 7),
    w=st.integers(1, 7),
    size=st.tuples(st.integers(1, 24), st.integers(1, 24)),
    geometry=geometries,
    extra=st.sampled_from([0.0, 0.1, 1.0]),
)
def test_flat_on_compares_only_the_cells_given(seed, n, u, h, w, size, geometry, extra) -> None:
    """Given any superset of the hot cells, in any order, the entries are the same: no
    other cell is compared (those away from hot cells are +inf here, which would be on)."""
    rng = np.random.default_rng(seed)
    maps = (rng.integers(0, 4, (n, u, h, w)) / 4).astype(np.float32)
    thr = rng.choice(maps.reshape(-1), u) if maps.size else np.zeros(u, np.float32)
    up = ThresholdedUpsample((h, w), size, size, geometry)
    expected = np.sort(up.flat_on(maps, thr, units=u + 1, offset=1))
    hot = maps >= thr[None, :, None, None]
    cells = np.flatnonzero(hot | (rng.random(maps.shape) < extra))
    cells = cells[rng.permutation(len(cells))]
    near = np.pad(hot, ((0, 0), (0, 0), (1, 1), (1, 1)))  # hot cells and their neighbours
    near = np.any([near[:, :, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)], 0)
    hidden = np.where(near, maps, np.inf).astype(np.float32)
    hidden.reshape(-1)[cells] = maps.reshape(-1)[cells]
    found = up.flat_on(hidden, thr, units=u + 1, offset=1, cells=cells)
    np.testing.assert_array_equal(np.sort(found), expected)


def test_flat_on_names_cells_outside_the_maps() -> None:
    up = ThresholdedUpsample((2, 2), (4, 4), (4, 4))
    with pytest.raises(ValueError, match=r"cells must be flat indices into maps \(0\.\.7\)"):
        up.flat_on(np.zeros((1, 2, 2, 2), np.float32), np.zeros(2, np.float32), cells=[8])
