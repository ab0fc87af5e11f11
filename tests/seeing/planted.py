"""Planted models for the FSD tests: colour images whose class shares are known by construction.

Classes are pure colours (``red``, ``green``, ``blue``); :class:`ColorSegmenter`
labels each pixel by its colour. :class:`StripeGenerator` paints the first
``k`` of 8 columns red and the rest green (``k`` from ``z``), so it never draws
blue; :class:`StripeSource` (the "real" images) paints red, green and blue bands.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from nethook.sources import Segmenter, concept_frame

SIZE = 8
COLORS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}


class ColorSegmenter(Segmenter):
    """``object`` classes red (1), green (2), blue (3), or the ``names`` given (same ids)."""

    categories = ("object",)

    def __init__(self, names: tuple[str, ...] = ("red", "green", "blue")) -> None:
        self.names = names

    def concepts(self):
        return concept_frame(
            range(1, len(self.names) + 1), self.names, ["object"] * len(self.names)
        )

    def segment(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        channel = images.argmax(dim=1) + 1
        bright = images.amax(dim=1) > 0.5
        return {"object": (channel * bright).long()[:, None]}


def paint(widths: list[tuple[int, int, int]]) -> torch.Tensor:
    """Images ``[B, 3, 8, 8]`` with ``r`` red, ``g`` green, ``b`` blue columns (then black)."""
    out = torch.zeros(len(widths), 3, SIZE, SIZE)
    for i, (r, g, b) in enumerate(widths):
        out[i, 0, :, :r] = 1
        out[i, 1, :, r : r + g] = 1
        out[i, 2, :, r + g : r + g + b] = 1
    return out


def true_shares(widths: list[tuple[int, int, int]]) -> np.ndarray:
    """``[B, 3]`` pixel shares of red, green, blue (columns / 8)."""
    return np.asarray(widths, np.float64) / SIZE


class StripeGenerator(nn.Module):
    """``z [B, 2]`` -> ``k = clamp(round(4 + 2 z_0), 0, 8)`` red columns, ``8 - k`` green."""

    z_dim = 2

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    @staticmethod
    def widths(z: torch.Tensor) -> list[tuple[int, int, int]]:
        k = (4 + 2 * z[:, 0]).round().clamp(0, SIZE).long().tolist()
        return [(r, SIZE - r, 0) for r in k]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return paint(self.widths(z)).to(z.device) + 0 * self.dummy


class StripeSource(torch.utils.data.Dataset):
    """``n`` real images with random red/green/blue column counts (seeded)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.widths = []
        for _ in range(n):
            r, g = rng.integers(0, 5, size=2)
            b = rng.integers(0, SIZE - r - g + 1)
            self.widths.append((int(r), int(g), int(b)))

    def __len__(self) -> int:
        return len(self.widths)

    def __getitem__(self, i: int) -> dict:
        return {"image": paint([self.widths[i]])[0], "index": i}
