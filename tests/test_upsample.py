"""Upsampling geometry: receptive-field centres and bilinear resampling onto labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nethook.upsample import Geometry, grid_upsample, infer_geometry, upsample


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
