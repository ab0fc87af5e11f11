"""A planted generator and a color segmenter whose ground truth the tests know.

``PlantedGenerator``: ``z [B, 16]`` -> ``layer`` (a linear map reshaped to
``[B, 12, 8, 8]``, ReLU) -> ``output`` (image ``[B, 3, 32, 32]``). The red channel
is ``sigmoid(GAIN * (sum of the CAUSAL units - BIAS))`` upsampled, so the causal
units (and only they) draw red "trees"; unit ``DECOY`` is an exact copy of causal
unit ``CAUSAL[0]``'s activation (same weights) but draws nothing, so it matches
trees as well as that unit does without causing them. The blue channel is the
complement of red ("sky").

``ColorSegmenter``: "tree" (id 1) where red > 0.5, "sky" (id 2) where blue > 0.5;
``probability`` is the differentiable version the causal search uses.
"""

from __future__ import annotations

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from nethook.sources import Segmenter, concept_frame

Z = 16
UNITS = 12
CAUSAL = (2, 5, 7)
DECOY = 9
GAIN = 6.0
BIAS = 5.0


class Render(nn.Module):
    """Features -> image: red from the causal units, blue its complement."""

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        drive = r[:, list(CAUSAL)].sum(1, keepdim=True)
        red = torch.sigmoid(GAIN * (drive - BIAS))
        red = F.interpolate(red, scale_factor=4, mode="bilinear", align_corners=False)
        return torch.cat([red, 0.2 * torch.ones_like(red), 1 - red], dim=1)


class Features(nn.Module):
    """``z -> relu(W z + b)`` reshaped to ``[B, UNITS, 8, 8]``."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.linear = nn.Linear(Z, UNITS * 64)
        with torch.no_grad():
            w = torch.randn(UNITS, 64, Z, generator=gen) * 0.6
            b = torch.randn(UNITS, 64, generator=gen) * 0.3
            w[DECOY], b[DECOY] = w[CAUSAL[0]], b[CAUSAL[0]]
            self.linear.weight.copy_(w.reshape(UNITS * 64, Z))
            self.linear.bias.copy_(b.reshape(-1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.relu(self.linear(z)).view(-1, UNITS, 8, 8)


class PlantedGenerator(nn.Sequential):
    """``layer`` then ``output``; ``z_dim`` = 16."""

    def __init__(self) -> None:
        super().__init__()
        self.add_module("layer", Features())
        self.add_module("output", Render())
        self.z_dim = Z


class ColorSegmenter(Segmenter):
    """tree = red > 0.5, sky = blue > 0.5 (category object)."""

    categories = ("object",)

    def concepts(self) -> pd.DataFrame:
        return concept_frame([1, 2], ["tree", "sky"], ["object", "object"])

    def segment(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        red = images[:, 0] > 0.5
        blue = images[:, 2] > 0.5
        ids = torch.where(red, 1, torch.where(blue, 2, 0))
        return {"object": ids[:, None].long()}

    def probability(self, images: torch.Tensor, concept: int) -> torch.Tensor:
        channel = 0 if concept == 1 else 2
        return torch.sigmoid(20 * (images[:, channel] - 0.5))


def scenes_seg():
    """The scenes-seg segmenter, registered through the plugin manager like an entry point."""
    import nethook_plugins.scenes_segmenter as module

    from nethook.plugins import PluginInfo, get_plugin_manager

    manager = get_plugin_manager()
    if "scenes-seg" not in manager.names("segmenter"):
        info = PluginInfo(name="scenes_segmenter", value="nethook_plugins.scenes_segmenter")
        manager.register_plugin(module, info)
    from nethook.plugins import get_segmenter

    return get_segmenter("scenes-seg")
