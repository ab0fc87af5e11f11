"""A small random generator whose layers are invertible (for the inversion tests)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

Z_DIM = 8


class ToyGenerator(nn.Sequential):
    """``z [B, 8]`` -> ``[B, 3, 16, 16]`` in (0, 1); stages ``layer1``, ``layer2``, ``output``."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        super().__init__(
            OrderedDict(
                layer1=nn.Sequential(nn.ConvTranspose2d(Z_DIM, 8, 4), nn.LeakyReLU(0.2)),
                layer2=nn.Sequential(
                    nn.Upsample(scale_factor=2), nn.Conv2d(8, 8, 3, padding=1), nn.LeakyReLU(0.2)
                ),
                output=nn.Sequential(
                    nn.Upsample(scale_factor=2), nn.Conv2d(8, 3, 3, padding=1), nn.Sigmoid()
                ),
            )
        )
        with torch.no_grad():  # default inits shrink signals; keep every layer O(1)
            for stage, gain in ((self.layer1, 3.0), (self.layer2, 2.0), (self.output, 4.0)):
                for p in stage.parameters():
                    p.mul_(gain)
        self.z_dim = Z_DIM
        self.eval()
