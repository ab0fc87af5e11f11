"""The static, offline HTML report of a dissection (``index.html`` + PNGs + JSON).

Everything the page needs sits next to it: figures under ``img/``, the data as
``summary.json``; the only script is a few lines of inline JavaScript that sort
the unit table. Every label and name goes through Jinja's autoescaping.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd
import xarray as xr
from tqdm.auto import tqdm

from nethook.atomic import write_text
from nethook.dissect import summary_table, unique_detectors
from nethook.report import plots

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("nethook.report", "templates"),
    autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
    undefined=jinja2.StrictUndefined,
)


def _categories(results: Mapping[str, xr.Dataset]) -> list[str]:
    cats: list[str] = []
    for ds in results.values():
        for cat in ds["concept_category"].values.astype(str):
            if cat not in cats:
                cats.append(cat)
    return cats


def write_report(
    results: Mapping[str, xr.Dataset],
    out: str | Path,
    *,
    title: str = "Network dissection",
    rotation: pd.DataFrame | None = None,
    max_gallery_units: int | None = None,
    progress: bool = True,
) -> Path:
    """Write the report for ``results`` (layer name -> dissection dataset) into ``out``.

    ``rotation`` (columns ``layer``, ``alpha``, ``unique``) adds the axis-alignment
    plot. Galleries show every unit (detectors first, by IoU), or the best
    ``max_gallery_units`` per layer. Returns the path of ``index.html``.
    """
    if not results:
        raise ValueError("results is empty: nothing to report")
    out = Path(out)
    img = out / "img"
    img.mkdir(parents=True, exist_ok=True)
    cats = _categories(results)
    colors = plots.category_colors(cats)
    summary = summary_table(results)
    plots.detectors_by_layer(summary, colors, img / "detectors_by_layer.png")
    if rotation is not None and len(rotation):
        missing = {"layer", "alpha", "unique"} - set(rotation.columns)
        if missing:
            raise ValueError(f"rotation table lacks columns {sorted(missing)}")
        plots.rotation_curve(rotation, img / "rotation.png")

    layers = []
    rows = []
    total = sum(int(ds.sizes["unit"]) for ds in results.values())
    bar = tqdm(total=total, desc="report", unit="unit", disable=not progress)
    for li, (layer, ds) in enumerate(results.items()):
        chart = f"img/layer{li}_categories.png"
        plots.unique_by_category(unique_detectors(ds), colors, f"{layer}", out / chart)
        order = np.lexsort((-ds["label_iou"].values, ~ds["detector"].values.astype(bool)))
        if max_gallery_units is not None:
            order = order[:max_gallery_units]
        has_gallery = "top_image" in ds and "top_mask" in ds
        units = []
        for i in order:
            unit = int(ds["unit"].values[i])
            src = None
            if has_gallery:
                src = f"img/layer{li}_unit{unit}.png"
                plots.unit_strip(ds["top_image"].values[i], ds["top_mask"].values[i], out / src)
            units.append(_unit_row(ds, i, layer, src))
            bar.update(1)
        rows.extend(_unit_row(ds, i, layer, None) for i in range(ds.sizes["unit"]))
        layers.append(
            {
                "index": li,
                "name": layer,
                "chart": chart,
                "units": units,
                "summary": summary.iloc[li].to_dict(),
                "attrs": {k: str(v) for k, v in ds.attrs.items() if k != "layer"},
            }
        )
    bar.close()
    html = _ENV.get_template("report.html").render(
        title=title,
        categories=cats,
        colors=colors,
        summary=summary.to_dict(orient="records"),
        summary_columns=list(summary.columns),
        layers=layers,
        rows=rows,
        rotation=rotation is not None and len(rotation) > 0,
    )
    payload = {"summary": summary.to_dict(orient="records")}
    if rotation is not None:
        payload["rotation"] = rotation.to_dict(orient="records")
    write_text(out / "summary.json", json.dumps(payload, indent=1, default=str))
    index = out / "index.html"
    write_text(index, html)
    return index


def _unit_row(ds: xr.Dataset, i: int, layer: str, src: str | None) -> dict:
    return {
        "layer": layer,
        "unit": int(ds["unit"].values[i]),
        "label": str(ds["label"].values[i]),
        "category": str(ds["category"].values[i]),
        "iou": float(ds["label_iou"].values[i]),
        "threshold": float(ds["threshold"].values[i]),
        "detector": bool(ds["detector"].values[i]),
        "src": src,
    }
