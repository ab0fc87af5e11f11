"""A small segmentation network for 32 x 32 scenes: object, part and material heads.

Three resolutions (32, 16, 8 px) of conv-BN-ReLU pairs, their features brought back
to full resolution and summed, then one 1 x 1 head per category. ``forward``
returns ``{category: logits [B, K_cat, H, W]}`` for normalized images; class 0 of
each head is "none" (:func:`nethook.gan.data.vocabulary`). The ``scenes-seg``
segmenter plugin (``plugins/scenes_segmenter.py``) wraps it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nethook.gan.data import CATEGORIES, vocabulary

WEIGHTS = Path(__file__).with_name("scene_segnet.pt")
WIDTHS = (16, 32, 64)


def _pair(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


class SegNet(nn.Module):
    """Multi-head segmentation net (see the module docstring)."""

    def __init__(self, widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        a, b, c = widths
        self.enc1, self.enc2, self.enc3 = _pair(3, a), _pair(a, b), _pair(b, c)
        self.lat1, self.lat2, self.lat3 = nn.Conv2d(a, a, 1), nn.Conv2d(b, a, 1), nn.Conv2d(c, a, 1)
        self.fuse = nn.Sequential(nn.BatchNorm2d(a), nn.ReLU(), nn.Conv2d(a, a, 3, padding=1))
        self.heads = nn.ModuleDict(
            {cat: nn.Conv2d(a, len(names), 1) for cat, names in vocabulary().items()}
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f1 = self.enc1(x)
        f2 = self.enc2(F.max_pool2d(f1, 2))
        f3 = self.enc3(F.max_pool2d(f2, 2))
        size = f1.shape[-2:]
        fused = (
            self.lat1(f1)
            + F.interpolate(self.lat2(f2), size=size, mode="bilinear", align_corners=False)
            + F.interpolate(self.lat3(f3), size=size, mode="bilinear", align_corners=False)
        )
        h = F.relu(self.fuse(fused))
        return {cat: self.heads[cat](h) for cat in CATEGORIES}


def scenes_segnet(weights: str | Path | None = None) -> SegNet:
    """The trained segmentation net in eval mode (shipped ``scene_segnet.pt`` by default)."""
    path = Path(weights) if weights else WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(
            f"segmenter weights {path} not found; train them with "
            "`python -m nethook.gan.train_segnet`"
        )
    model = SegNet()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()
