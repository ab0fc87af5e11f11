"""A procedural concept source: light and dark stripes with pixel-exact labels."""

from __future__ import annotations

import pandas as pd
import torch

from nethook.sources import ConceptSource, concept_frame, tally_frequency

LIGHT, DARK, HORIZONTAL, VERTICAL = 1, 2, 3, 4
LIGHT_VALUE, DARK_VALUE = 0.9, 0.1


class StripesSource(ConceptSource):
    """Images of light and dark stripes of width ``period // 2``, randomly oriented.

    Dense category ``color``: each pixel is ``light`` (id 1) or ``dark`` (id 2).
    Whole-image category ``orientation``: ``horizontal`` (3) or ``vertical`` (4).
    Item ``i`` depends only on ``(seed, i)``, so workers and reruns agree.
    """

    categories = ("color",)
    image_categories = ("orientation",)

    def __init__(self, n: int = 16, size: int = 32, period: int = 8, seed: int = 0) -> None:
        for name, value, low in (("n", n, 0), ("size", size, 1), ("period", period, 2)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"stripes: {name}={value!r}; expected an integer >= {low}")
        self.n, self.size, self.period, self.seed = n, size, period, int(seed)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.n:
            raise IndexError(f"stripes: index {index} out of range [0, {self.n})")
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        vertical = bool(torch.randint(2, (1,), generator=generator))
        offset = int(torch.randint(self.period, (1,), generator=generator))
        dark = (torch.arange(self.size) + offset) // (self.period // 2) % 2 == 1
        mask = (
            dark[None, :].expand(self.size, -1) if vertical else dark[:, None].expand(-1, self.size)
        )
        labels = torch.where(mask, DARK, LIGHT).to(torch.int64)
        image = torch.where(mask, DARK_VALUE, LIGHT_VALUE).expand(3, -1, -1).contiguous()
        orientation = torch.tensor([VERTICAL if vertical else HORIZONTAL])
        return {
            "image": image.float(),
            "labels": {"color": labels[None]},
            "image_labels": {"orientation": orientation},
            "index": index,
        }

    def concepts(self) -> pd.DataFrame:
        """The four concepts, with the number of images each appears in."""
        frequency = tally_frequency(self, VERTICAL + 1, progress=False)
        ids = [LIGHT, DARK, HORIZONTAL, VERTICAL]
        return concept_frame(
            ids,
            ["light", "dark", "horizontal", "vertical"],
            ["color", "color", "orientation", "orientation"],
            frequency[ids],
        )

    def fingerprint_parts(self) -> dict:
        """Everything that decides the content."""
        return {"n": self.n, "size": self.size, "period": self.period, "seed": self.seed}
