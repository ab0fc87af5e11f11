"""Network Dissection: label every unit of a layer with the concept it detects.

(thesis ch. 3; ``shared/METHODS.md`` section 1). Pass 1 finds each unit's top-quantile
threshold with a :class:`~nethook.stats.quantile.Quantile` sketch; pass 2 tallies the
intersection and union of each unit's thresholded, upsampled activation map with
every concept's label map (:class:`~nethook.stats.iou.IoU`), category-conditioned;
a third, small pass renders the top-activating images of each unit for galleries.

Results per layer are an ``xarray.Dataset`` (the *dissection dataset*):

========================  =============================  ==================================
variable                  dims                           meaning
========================  =============================  ==================================
``iou``                   ``unit, concept``              IoU of every unit with every concept
``threshold``             ``unit``                       activation threshold ``T_k``
``label``                 ``unit``                       name of the best concept
``label_id``              ``unit``                       id of the best concept
``category``              ``unit``                       category of the best concept
``label_iou``             ``unit``                       IoU with the best concept
``detector``              ``unit``                       ``label_iou > min_iou``
``top_index``             ``unit, rank``                 sample indices of top activations
``top_value``             ``unit, rank``                 the unit's max activation on them
``top_image``             ``unit, rank, y, x, rgb``      thumbnails (uint8), optional
``top_mask``              ``unit, rank, y, x``           the unit's mask on them, optional
========================  =============================  ==================================

with coordinates ``unit``, ``concept`` (concept ids), ``concept_name`` and
``concept_category`` (along ``concept``), and attrs ``layer``, ``model``, ``source``,
``quantile``, ``min_iou``, ``rotate`` (alpha or ``None``), ``seed``.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

DEFAULT_QUANTILE = 0.005
DEFAULT_MIN_IOU = 0.04


def label_units(iou: xr.DataArray, min_iou: float = DEFAULT_MIN_IOU) -> xr.Dataset:
    """Pick each unit's best concept from ``iou[unit, concept]``.

    Returns a dataset with ``label``, ``label_id``, ``category``, ``label_iou`` and
    ``detector`` along ``unit``. ``iou`` must carry the ``concept_name`` and
    ``concept_category`` coordinates.
    """
    for dim in ("unit", "concept"):
        if dim not in iou.dims:
            raise ValueError(f"iou must have dims ('unit', 'concept'), got {iou.dims}")
    for coord in ("concept_name", "concept_category"):
        if coord not in iou.coords:
            raise ValueError(f"iou lacks the coordinate {coord!r} along 'concept'")
    values = np.nan_to_num(iou.transpose("unit", "concept").values, nan=0.0)
    if values.shape[1] == 0:
        raise ValueError("iou has no concepts; the concept source published an empty table")
    best = values.argmax(axis=1)
    best_iou = values[np.arange(len(best)), best]
    names = iou["concept_name"].values[best].astype(str)
    cats = iou["concept_category"].values[best].astype(str)
    ids = iou["concept"].values[best].astype(np.int64)
    return xr.Dataset(
        {
            "label": ("unit", names.astype(object)),
            "label_id": ("unit", ids),
            "category": ("unit", cats.astype(object)),
            "label_iou": ("unit", best_iou.astype(np.float32)),
            "detector": ("unit", best_iou > min_iou),
        },
        coords={"unit": iou["unit"].values},
    )


def unique_detectors(ds: xr.Dataset) -> dict[str, int]:
    """Number of unique concepts among the detectors of one layer, by category."""
    det = ds["detector"].values.astype(bool)
    frame = pd.DataFrame(
        {"label": ds["label"].values[det].astype(str), "category": ds["category"].values[det]}
    )
    counts = frame.drop_duplicates("label").groupby("category").size()
    return {str(k): int(v) for k, v in counts.items()}


def summary_table(results: Mapping[str, xr.Dataset]) -> pd.DataFrame:
    """One row per layer: units, detectors, unique concepts, and unique concepts by category."""
    rows = []
    categories: list[str] = []
    for ds in results.values():
        for cat in ds["concept_category"].values.astype(str):
            if cat not in categories:
                categories.append(cat)
    for layer, ds in results.items():
        uniq = unique_detectors(ds)
        row = {
            "layer": layer,
            "units": int(ds.sizes["unit"]),
            "detectors": int(ds["detector"].values.sum()),
            "unique": int(sum(uniq.values())),
        }
        row.update({cat: uniq.get(cat, 0) for cat in categories})
        rows.append(row)
    return pd.DataFrame(rows, columns=["layer", "units", "detectors", "unique", *categories])


def results_json(results: Mapping[str, xr.Dataset]) -> dict:
    """The ``results.json`` document: per layer, per unit label, category, IoU, threshold."""
    layers = {}
    for layer, ds in results.items():
        units = []
        for i, unit in enumerate(ds["unit"].values):
            units.append(
                {
                    "unit": int(unit),
                    "label": str(ds["label"].values[i]),
                    "category": str(ds["category"].values[i]),
                    "iou": float(ds["label_iou"].values[i]),
                    "threshold": float(ds["threshold"].values[i]),
                    "detector": bool(ds["detector"].values[i]),
                }
            )
        layers[layer] = {"units": units, "unique_detectors": unique_detectors(ds)}
    return {"layers": layers}


def results_frame(results: Mapping[str, xr.Dataset]) -> pd.DataFrame:
    """All units of all layers as one table (the CSV written next to ``results.json``)."""
    rows = []
    for layer, unit_list in results_json(results)["layers"].items():
        rows.extend({"layer": layer, **u} for u in unit_list["units"])
    return pd.DataFrame(
        rows, columns=["layer", "unit", "label", "category", "iou", "threshold", "detector"]
    )


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _zarr_ready(ds: xr.Dataset) -> xr.Dataset:
    """Turn object (string) variables into fixed-width unicode so Zarr v3 stores them."""
    out = ds.copy()
    for name, var in list(out.variables.items()):
        if var.dtype == object:
            out[name] = var.astype(str)
    out.attrs = {k: (json.dumps(v) if not isinstance(v, str) else v) for k, v in ds.attrs.items()}
    return out


def save_results(results: Mapping[str, xr.Dataset], out: str | Path) -> Path:
    """Write ``results.zarr`` (one group per layer), ``results.json`` and ``results.csv``.

    Each file is complete or absent: the Zarr store is written under a temporary
    name and renamed, JSON and CSV likewise.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "results.zarr"
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".results.zarr."))
    try:
        for i, ds in enumerate(results.values()):
            with warnings.catch_warnings():
                # fixed-width unicode has no finalized Zarr v3 spec yet; zarr-python reads it
                warnings.filterwarnings("ignore", message=".*does not have a Zarr V3 specification")
                _zarr_ready(ds).to_zarr(
                    tmp, group=f"layer{i}", mode="w", consolidated=False, zarr_format=3
                )
        order = {f"layer{i}": layer for i, layer in enumerate(results)}
        (tmp / "layers.json").write_text(json.dumps(order))
        if store.exists():
            old = out / f".results.zarr.old.{os.getpid()}"
            os.replace(store, old)
            os.replace(tmp, store)
            _rmtree(old)
        else:
            os.replace(tmp, store)
    except BaseException:
        _rmtree(tmp)
        raise
    _atomic_write_text(out / "results.json", json.dumps(results_json(results), indent=1))
    _atomic_write_text(out / "results.csv", results_frame(results).to_csv(index=False))
    return store


def load_results(path: str | Path) -> dict[str, xr.Dataset]:
    """Read back what :func:`save_results` wrote (``DIR`` or ``DIR/results.zarr``)."""
    path = Path(path)
    if (path / "results.zarr").is_dir():
        path = path / "results.zarr"
    index = path / "layers.json"
    if not index.is_file():
        raise FileNotFoundError(f"{path} is not a dissection result (no layers.json inside)")
    order = json.loads(index.read_text())
    results = {}
    for group, layer in order.items():
        ds = xr.open_zarr(path, group=group, consolidated=False, zarr_format=3).load()
        attrs = {}
        for k, v in ds.attrs.items():
            try:
                attrs[k] = json.loads(v) if k != "layer" else v
            except (TypeError, json.JSONDecodeError):
                attrs[k] = v
        ds.attrs = attrs
        results[layer] = ds
    return results


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
