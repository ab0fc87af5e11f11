"""An intervention: clamp units of a layer's output into ``[low, high]``."""

from __future__ import annotations

import dataclasses

import torch

from nethook.interventions import Intervention, register


@register
@dataclasses.dataclass(eq=False, repr=False)
class Clamp(Intervention):
    """Clamp ``units`` (all by default) into ``[low, high]``, inside the optional region.

    Use as ``Trace(model, layer, edit_output=Clamp(high=0.0))``. Subclassing
    :class:`nethook.interventions.Intervention` brings unit selection, masks, any
    device, ``to_json()`` and ``nethook.interventions.from_json`` for free.
    """

    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.low is None and self.high is None:
            raise ValueError("Clamp: give low=..., high=... or both")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"Clamp: low={self.low} is greater than high={self.high}")

    def target(self, r: torch.Tensor) -> torch.Tensor:
        return r.clamp(min=self.low, max=self.high)
