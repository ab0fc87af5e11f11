"""colors: name every pixel with one of the 11 basic color terms (Broden's color category).

Each term has a few prototype colors (focal and common light/dark variants, from
the CSS/X11 named colors); a pixel takes the term of its nearest prototype in
CIELAB (D65), where Euclidean distance roughly follows perceived difference.
Runs on whatever device the images are on. Spec: ``colors``.
"""

from __future__ import annotations

import pandas as pd
import pluggy
import torch

from nethook.sources import Segmenter, concept_frame

__all__ = ["COLOR_TERMS", "ColorSegmenter", "nethook_segmenters", "rgb_to_lab"]

hookimpl = pluggy.HookimplMarker("nethook")

COLOR_TERMS: tuple[str, ...] = (
    "black",
    "blue",
    "brown",
    "grey",
    "green",
    "orange",
    "pink",
    "purple",
    "red",
    "white",
    "yellow",
)

#: sRGB (0-255) prototypes of each term.
PROTOTYPES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "black": ((0, 0, 0), (28, 28, 32)),
    "blue": (
        (0, 0, 255),
        (30, 144, 255),
        (135, 206, 235),
        (0, 0, 139),
        (70, 130, 180),
        (65, 105, 225),
        (100, 149, 237),
        (25, 25, 112),
        (30, 60, 160),
    ),
    "brown": (
        (139, 69, 19),
        (160, 82, 45),
        (101, 67, 33),
        (128, 80, 40),
        (150, 100, 55),
        (92, 64, 51),
    ),
    "grey": ((128, 128, 128), (96, 96, 96), (169, 169, 169), (112, 128, 144), (190, 190, 190)),
    "green": (
        (0, 128, 0),
        (0, 255, 0),
        (34, 139, 34),
        (144, 238, 144),
        (85, 107, 47),
        (0, 100, 0),
        (107, 142, 35),
        (50, 205, 50),
    ),
    "orange": ((255, 140, 0), (255, 165, 0), (235, 120, 30), (255, 127, 60), (205, 102, 0)),
    "pink": (
        (255, 192, 203),
        (255, 105, 180),
        (219, 112, 147),
        (255, 20, 147),
        (250, 150, 170),
        (240, 128, 160),
    ),
    "purple": (
        (128, 0, 128),
        (148, 0, 211),
        (186, 85, 211),
        (75, 0, 130),
        (147, 112, 219),
        (102, 51, 153),
    ),
    "red": ((255, 0, 0), (200, 20, 20), (139, 0, 0), (220, 50, 40), (178, 34, 34)),
    "white": ((255, 255, 255), (240, 240, 236), (225, 225, 228)),
    "yellow": ((255, 255, 0), (255, 215, 0), (240, 230, 140), (250, 250, 150), (235, 215, 70)),
}

_WHITE_D65 = (0.95047, 1.0, 1.08883)
_RGB_TO_XYZ = (
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], channels in dim 1 (``[B, 3, ...]``) -> CIELAB (D65), same shape."""
    rgb = rgb.clamp(0.0, 1.0)
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    matrix = torch.tensor(_RGB_TO_XYZ, dtype=rgb.dtype, device=rgb.device)
    white = torch.tensor(_WHITE_D65, dtype=rgb.dtype, device=rgb.device)
    xyz = torch.einsum("kc,bc...->bk...", matrix, linear)
    xyz = xyz / white.view(1, 3, *([1] * (rgb.dim() - 2)))
    eps, kappa = 216 / 24389, 24389 / 27
    f = torch.where(xyz > eps, xyz.clamp_min(eps) ** (1 / 3), (kappa * xyz + 16) / 116)
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def _prototype_table() -> tuple[torch.Tensor, torch.Tensor]:
    """Prototype Lab colors ``[P, 3]`` and the term index (0-based) of each ``[P]``."""
    rgb, term = [], []
    for i, name in enumerate(COLOR_TERMS):
        for color in PROTOTYPES[name]:
            rgb.append([c / 255 for c in color])
            term.append(i)
    lab = rgb_to_lab(torch.tensor(rgb, dtype=torch.float64))
    return lab.float(), torch.tensor(term, dtype=torch.int64)


class ColorSegmenter(Segmenter):
    """Assigns each pixel a basic color term by nearest CIELAB prototype.

    Output ``{"color": int64 [B, 1, H, W]}`` with concept ids 1..11 in the order of
    :data:`COLOR_TERMS`. ``chunk`` bounds how many pixels are compared at once.
    """

    categories = ("color",)

    def __init__(self, chunk: int = 1 << 18) -> None:
        if not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"colors: chunk={chunk!r}; expected a positive number of pixels")
        self.chunk = chunk
        self._lab, self._term = _prototype_table()

    def concepts(self) -> pd.DataFrame:
        """The 11 color terms, ids 1..11, category "color" (frequency unknown: NaN)."""
        n = len(COLOR_TERMS)
        return concept_frame(range(1, n + 1), COLOR_TERMS, ["color"] * n)

    def fingerprint_parts(self) -> dict:
        """The prototype table decides the output."""
        return {"prototypes": {k: list(v) for k, v in PROTOTYPES.items()}}

    def name_colors(self, rgb: torch.Tensor) -> torch.Tensor:
        """Term index (0-based, into :data:`COLOR_TERMS`) of colors ``[N, 3]`` in [0, 1]."""
        lab = rgb_to_lab(rgb.float())
        protos = self._lab.to(lab.device)
        terms = self._term.to(lab.device)
        out = torch.empty(len(lab), dtype=torch.int64, device=lab.device)
        for start in range(0, len(lab), self.chunk):
            part = lab[start : start + self.chunk]
            out[start : start + self.chunk] = terms[torch.cdist(part, protos).argmin(dim=1)]
        return out

    def segment(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Label images ``[B, 3, H, W]`` in [0, 1] -> ``{"color": int64 [B, 1, H, W]}``."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"colors: expected images [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}"
            )
        b, _, h, w = images.shape
        pixels = images.permute(0, 2, 3, 1).reshape(-1, 3)
        ids = self.name_colors(pixels) + 1
        return {"color": ids.view(b, 1, h, w)}


def _factory(arg: str) -> ColorSegmenter:
    from nethook.plugins import parse_kwargs

    return ColorSegmenter(**parse_kwargs(arg))


@hookimpl
def nethook_segmenters():
    """Register the ``colors`` segmenter."""
    return {"colors": _factory}
