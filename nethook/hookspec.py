"""Hook specifications: everything a nethook plugin can provide.

A plugin is a module (or any object) with functions named after these hooks and
marked with :data:`nethook.plugins.hookimpl`. It is found through the ``nethook``
entry-point group (see ``docs/plugins.md``). Every hook is optional: implement the
ones for the kinds you provide.

The six registration hooks each return a dict ``{name: factory}``. A factory is
called with the part of a spec after the first colon, so ``scenes:n=2000,seed=0``
calls the factory registered as ``scenes`` with ``"n=2000,seed=0"``; use
:func:`nethook.plugins.parse_kwargs` to read it. The host calls every plugin's
registration hook and keeps track of who registered which name: two plugins that
claim one name are an error naming both distributions. None of them is
``firstresult``: every plugin contributes.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("nethook")

Factory = Callable[[str], Any]
"""Builds a plugin object from the argument part of a spec (``"a=1,b=x"``)."""


@hookspec
def nethook_concept_sources() -> Mapping[str, Factory]:
    """Register concept sources: data sets of images with concept labels.

    Return ``{name: factory}``; ``factory(arg)`` returns a
    :class:`nethook.sources.ConceptSource` (a ``torch.utils.data.Dataset`` of dicts
    with ``image``, ``labels``, ``image_labels`` and ``index``, plus ``concepts()``,
    ``normalization`` and ``fingerprint()``). Looked up by
    :func:`nethook.plugins.get_source`, e.g. ``broden:/data/broden1_224``.
    """


@hookspec
def nethook_segmenters() -> Mapping[str, Factory]:
    """Register segmenters: models that label any image with concepts per pixel.

    Return ``{name: factory}``; ``factory(arg)`` returns a
    :class:`nethook.sources.Segmenter` (``concepts()``, ``categories`` and
    ``segment(images [B,3,H,W]) -> {category: int64 [B, L, H, W]}``). Looked up by
    :func:`nethook.plugins.get_segmenter`.
    """


@hookspec
def nethook_scorers() -> Mapping[str, Factory]:
    """Register scorers: rules that score each (unit, concept) pair.

    Return ``{name: factory}``; ``factory(arg)`` returns an object that turns unit
    activations and concept labels into a score per unit and concept (an
    ``xarray.DataArray`` with dims ``unit`` and ``concept``), e.g. IoU at a
    top-quantile threshold. Looked up by :func:`nethook.plugins.get_scorer`.
    """


@hookspec
def nethook_interventions() -> Mapping[str, Factory]:
    """Register interventions: changes applied to a layer's output.

    Return ``{name: factory}``; ``factory(arg)`` returns a callable usable as a
    trace's ``edit_output(output, layer) -> output`` (ablate, replace, scale, add a
    direction, ...), ideally with ``to_json()``. Looked up by
    :func:`nethook.plugins.get_intervention`.
    """


@hookspec
def nethook_inverters() -> Mapping[str, Factory]:
    """Register inverters: image -> a generator's representation at some layer.

    Return ``{name: factory}``; ``factory(arg)`` returns an inverter object (for
    instance layer-wise encoders followed by optimization). Looked up by
    :func:`nethook.plugins.get_inverter`.
    """


@hookspec
def nethook_rewriters() -> Mapping[str, Factory]:
    """Register rewriters: weight edits of one layer from keys, values and context.

    Return ``{name: factory}``; ``factory(arg)`` returns a rewriter object (e.g. a
    reversible rank-one or low-rank update). Looked up by
    :func:`nethook.plugins.get_rewriter`.
    """


@hookspec
def nethook_add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add subcommands to the ``nethook`` command line.

    Call ``subparsers.add_parser(name, help=...)`` and set a default ``func``
    taking the parsed arguments and returning an exit code, exactly as the core
    commands do::

        p = subparsers.add_parser("hello", help="say hello")
        p.set_defaults(func=lambda args: print("hello") or 0)

    A plugin whose hook raises loses its commands; the rest of the CLI still works.
    """


@hookspec
def nethook_report_sections(report: str, results: Mapping[str, Any]) -> Iterable[tuple[str, str]]:
    """Add sections to a report that a pipeline writes.

    ``report`` names the pipeline (``"dissect"``, ``"gandissect"``, ...) and
    ``results`` holds what it computed (xarray / pandas objects, keyed by name).
    Return ``(title, html)`` pairs to append to the report, or nothing to skip it.
    """
