"""An intervention: clamp a layer's output into ``[min, max]``."""

from __future__ import annotations

import torch


class Clamp:
    """Use as ``Trace(model, layer, edit_output=Clamp(max=0.0))``; works on any device."""

    def __init__(self, min: float | None = None, max: float | None = None) -> None:
        if min is None and max is None:
            raise ValueError("clamp: give min=..., max=... or both")
        if min is not None and max is not None and min > max:
            raise ValueError(f"clamp: min={min} is greater than max={max}")
        self.min, self.max = min, max

    def __call__(self, output: torch.Tensor, layer: str | None = None) -> torch.Tensor:
        return output.clamp(min=self.min, max=self.max)

    def to_json(self) -> dict:
        """A plain description, so runs that used it can record it."""
        return {"class": "Clamp", "min": self.min, "max": self.max}
