"""scenes: a procedural, seedable concept data set (the offline default).

Spec ``scenes:n=2000,size=128,seed=0`` (all optional; ``size`` may be ``HxW``;
``noise`` is the std of per-pixel Gaussian noise, default 0.02). Sample ``i`` is a
pure function of ``(seed, i, size, noise)``, so any order and any number of
DataLoader workers give the same images. The vocabulary and how scenes are
composed are documented in ``docs/scenes.md``.
"""

from __future__ import annotations

import pluggy

from .concepts import CATEGORIES, IMAGE_CATEGORIES
from .source import Scenes

__all__ = ["CATEGORIES", "IMAGE_CATEGORIES", "Scenes", "nethook_concept_sources"]

hookimpl = pluggy.HookimplMarker("nethook")

OPTIONS = frozenset({"n", "size", "seed", "noise", "progress"})


def _factory(arg: str) -> Scenes:
    from nethook.plugins import parse_kwargs

    kwargs = parse_kwargs(arg)
    unknown = sorted(set(kwargs) - OPTIONS)
    if unknown:
        raise ValueError(f"scenes:{arg}: unknown option(s) {unknown}; expected {sorted(OPTIONS)}")
    return Scenes(**kwargs)


@hookimpl
def nethook_concept_sources():
    """Register the ``scenes`` concept source."""
    return {"scenes": _factory}
