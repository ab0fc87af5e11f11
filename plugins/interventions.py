"""The core interventions, registered as a plugin like any third-party one.

Specs name the intervention and its parameters, e.g. ``ablate:units=[3,7]``,
``replace:units=[1],values=[2.5]``, ``scale:units=[0],factor=0.5``,
``partial-ablate:units=[2,4],alpha=[0.5,1.0]`` — the keyword arguments of the
classes in :mod:`nethook.interventions`.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

from nethook import interventions as core

hookimpl = pluggy.HookimplMarker("nethook")

NAMES = {
    "ablate": core.Ablate,
    "replace": core.Replace,
    "scale": core.Scale,
    "add-direction": core.AddDirection,
    "partial-ablate": core.PartialAblate,
    "partial-insert": core.PartialInsert,
}


def _factory(cls: type[core.Intervention]) -> Callable[[str], core.Intervention]:
    def build(arg: str) -> core.Intervention:
        from nethook.plugins import parse_kwargs

        return cls(**parse_kwargs(arg))

    build.__doc__ = f"Build :class:`nethook.interventions.{cls.__name__}` from spec arguments."
    return build


@hookimpl
def nethook_interventions():
    """Every core intervention under its spec name."""
    return {name: _factory(cls) for name, cls in NAMES.items()}
