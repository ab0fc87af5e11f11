"""First-party rewriters: rank-one and low-rank weight edits (:mod:`nethook.rewrite`).

Specs: ``rank-one`` (closed form, one direction per key), ``low-rank:rank=3``
(context rank reduction), ``least-squares:weight=1.0`` (the soft MEMIT form),
``optimize:steps=500,lr=0.05`` and ``pgd:steps=2001,lr=0.05`` (nonlinear layers).
Every option of :func:`nethook.rewrite.insert` can be given, e.g. ``ridge=1e-3``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pluggy
import torch
from torch import nn

from nethook.rewrite import Edit, insert

hookimpl = pluggy.HookimplMarker("nethook")

METHODS = {
    "rank-one": "closed_form",
    "low-rank": "closed_form",
    "least-squares": "least_squares",
    "optimize": "optimize",
    "pgd": "pgd",
}


@dataclass
class Rewriter:
    """A configured rewriting method: ``rewriter.insert(model, layer, keys, values, C)``."""

    method: str
    options: dict[str, Any] = field(default_factory=dict)

    def insert(
        self,
        model: nn.Module,
        layer: str,
        keys: torch.Tensor,
        values: torch.Tensor,
        C: torch.Tensor,
        context: torch.Tensor | None = None,
        **overrides: Any,
    ) -> Edit:
        """Compute the edit (see :func:`nethook.rewrite.insert`); the model is unchanged."""
        options = {**self.options, **overrides}
        return insert(model, layer, keys, values, C, context=context, method=self.method, **options)


def _factory(name: str):
    def build(arg: str) -> Rewriter:
        from nethook.plugins import parse_kwargs

        options = parse_kwargs(arg)
        if name == "low-rank" and "rank" not in options:
            raise ValueError("low-rank rewriter needs a rank, e.g. 'low-rank:rank=3'")
        return Rewriter(METHODS[name], options)

    build.__doc__ = f"Build the {name!r} rewriter from spec arguments."
    return build


@hookimpl
def nethook_rewriters():
    """The rewriting methods of :mod:`nethook.rewrite` under their spec names."""
    return {name: _factory(name) for name in METHODS}
