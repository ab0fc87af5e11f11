"""Network Dissection: label every unit of a layer with the concept it detects.

(thesis ch. 3; ``shared/METHODS.md`` section 1). Pass 1 finds each unit's top-quantile
threshold with a :class:`~nethook.stats.TopQuantile` sketch; pass 2 tallies the
intersection and union of each unit's thresholded, upsampled activation map with
every concept's label map (:class:`~nethook.stats.iou.IoU`), category-conditioned.
By default pass 1 also records, in a temporary :class:`~nethook.batchlog.BatchLog`,
the few activations that can still reach a threshold (those above the sketch's
running floor, with their neighbourhoods), each image's concept labels and its
gallery thumbnail, and pass 2 rebuilds the masks from them instead of rendering the
images and running the model again (``pass2="recompute"`` does the latter). The
top-activating images of each unit are gathered for galleries in passing.

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
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr
from torch import nn

from nethook.atomic import write_text
from nethook.batchlog import BatchLog
from nethook.models import model_device
from nethook.offload import cpu_cores, in_parallel
from nethook.rotation import Rotate
from nethook.stats.base import as_numpy, from_state_dict
from nethook.stats.iou import IoU
from nethook.stats.top_quantile import TopQuantile
from nethook.upsample import (
    Geometry,
    ThresholdedUpsample,
    infer_geometry,
    is_identity,
    upsample,
)

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
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
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
    write_text(out / "results.json", json.dumps(results_json(results), indent=1))
    write_text(out / "results.csv", results_frame(results).to_csv(index=False))
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


# ---- the pipeline ----------------------------------------------------------------------


class _LayerPass1:
    """Pass 1 for one layer: its threshold sketch and its top images, checkpointable.

    The maps are prepared once for both. The sketch (:class:`TopQuantile`) sees every
    position of every image but keeps only the values above its floor, a few percent
    of them; the top images are ranked by each unit's peak activation.
    """

    def __init__(
        self,
        layer: str,
        prepare: Callable[[torch.Tensor], torch.Tensor],
        sketch: TopQuantile,
        top: Any,
    ):
        self.layer = layer
        self.layers = (layer,)
        self.prepare = prepare
        self.sketch = sketch
        self.top = top
        self.last: tuple[int, torch.Tensor] | None = None  # (batch number, prepared maps)
        self.above: tuple[int | None, Any] = (None, None)  # (batch number, sketch.above)

    def maps(self, batch) -> torch.Tensor:
        """The batch's maps, prepared (once per batch: the recorder reuses them)."""
        if self.last is None or self.last[0] != batch.number:
            self.last = (batch.number, self.prepare(batch.acts[self.layer]).detach())
        return self.last[1]

    def __call__(self, batch) -> None:
        acts = self.maps(batch)
        n, units = acts.shape[:2]
        if acts.device.type == "cpu":  # numpy's reductions: faster here
            peak = torch.from_numpy(acts.numpy().reshape(n, units, -1).max(2))
        else:
            peak = acts.reshape(n, units, -1).amax(2)
        self.top.update(peak, batch.positions.to(peak.device))
        self.sketch.update(acts)
        self.above = (batch.number, self.sketch.above)

    def cells_above(self, batch) -> Any:
        """The flat indices the sketch took from ``batch`` (None if it skipped the batch)."""
        number, above = self.above
        return above if number == batch.number else None

    def state_dict(self) -> dict[str, Any]:
        return {"sketch": self.sketch.state_dict(), "top": self.top.state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.sketch.load_state_dict(sd["sketch"])
        self.top.load_state_dict(sd["top"])

    def merge_state(self, sd: dict[str, Any]) -> None:
        """Fold in the pass 1 of another part of the images (a state of this object)."""
        self.sketch.merge(from_state_dict(sd["sketch"]))
        self.top.merge(from_state_dict(sd["top"]))


class _HotRecorder:
    """Pass 1's record for pass 2: per batch, the cells of each layer that may be on.

    Every activation at or above a unit's final threshold is above the floor of the
    unit's sketch at any time (:class:`TopQuantile` keeps its floor below the
    threshold, and :func:`_threshold` checks it), so the cells above the floor, with
    their 3 x 3 neighbourhoods on layers that are upsampled (the corners of every
    label tile next to them), decide the unit's masks exactly; :func:`_replay` fills
    the rest of each map with the floor, which lies below the threshold. A batch is
    written ``lag`` batches late (or once the sketches place the values their warmup
    holds), when the floor has risen further (it starts loose:
    the early batches would otherwise hold most of the log), so only a few percent of
    the activations are kept; held batches cost at most ``lag`` batches of memory
    (references: the runner makes new tensors for every batch). The concept labels
    come from :class:`_Recorder`; thumbnails are kept only of the images that are
    still among some unit's top images when the batch is written (an image that has
    dropped out of a running top-k cannot come back). A consumer of
    pass 1 (after the layers' :class:`_LayerPass1`); a rerun starts at the first
    batch missing from the log (of its ``shard`` ``(part, parts)`` where pass 1 is
    split over processes), and :meth:`close` writes the batches still held.
    """

    lag = 3

    def __init__(
        self,
        log: BatchLog,
        pass1: Mapping[str, _LayerPass1],
        geometries: Mapping[str, Geometry | None],
        record: _Recorder,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.log = log
        self.shard = shard
        self.pass1 = dict(pass1)
        self.layers = tuple(self.pass1)
        self.geometries = dict(geometries)
        self.record = record
        self.held: list[tuple[int, dict[str, np.ndarray], list[tuple], Any]] = []

    def resume_batch(self, batch_size: int) -> int:
        return self.log.done(*self.shard)

    def __call__(self, batch) -> None:
        arrays = {name: as_numpy(t) for name, t in self.record(batch).items()}
        maps = [(first.maps(batch), first.cells_above(batch)) for first in self.pass1.values()]
        images = (batch.data["image"], batch.positions) if self.record.thumb else None
        self.held.append((batch.number, arrays, maps, images))
        holding = any(first.sketch.holding for first in self.pass1.values())
        while len(self.held) > self.lag and not holding:
            self._write(*self.held.pop(0))

    def close(self) -> None:
        """Write the batches held back (at the end of pass 1, the sketches settled)."""
        for first in self.pass1.values():
            first.sketch.settle()
        while self.held:
            self._write(*self.held.pop(0))

    def abort(self) -> None:
        """Drop the batches held back (a rerun records them again)."""
        self.held = []

    def _write(self, number: int, arrays: dict[str, np.ndarray], maps: list, images) -> None:
        if images is not None:
            images, positions = images
            top = np.concatenate(
                [as_numpy(first.top.indices()).ravel() for first in self.pass1.values()]
            )
            rows = np.flatnonzero(np.isin(as_numpy(positions), top))
            arrays["thumb_rows"] = rows
            arrays["thumb"] = as_numpy(
                thumbnails(images[torch.from_numpy(rows)], self.record.thumb)
            )
        label_size = tuple(arrays["labels"].shape[-2:])
        for i, (layer, first) in enumerate(self.pass1.items()):
            acts, above = maps[i]
            acts = as_numpy(acts)
            floor = as_numpy(first.sketch.floor).astype(acts.dtype)  # the sketch's dtype
            size = tuple(acts.shape[-2:])
            grow = not is_identity(size, label_size, self.record.input_size, self.geometries[layer])
            hot, index = _hot_cells(acts, above, floor, grow)
            arrays[f"floor{i}"] = floor
            arrays[f"index{i}"] = index.astype(np.int32 if acts.size < 2**31 else np.int64)
            arrays[f"value{i}"] = acts.reshape(-1)[index]
            if grow:  # which kept cells are above the floor (without grow: all of them)
                arrays[f"hot{i}"] = np.zeros(index.size, bool)
                arrays[f"hot{i}"][np.searchsorted(index, hot)] = True
        self.log.write(number, arrays)


def _hot_cells(
    maps: np.ndarray, above, floor: np.ndarray, grow: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of the cells of ``maps`` ``[N, U, h, w]`` above ``floor``, and of
    the cells to keep: those, with (``grow``) their 3 x 3 neighbourhoods.

    ``above`` are the indices the sketch took (above its floor then, which is at
    most ``floor``), so only they are compared (None: compare every cell, for a
    batch the sketch skipped on resuming). Neighbourhoods are marked in a scratch
    mask, then read back in order.
    """
    n, units, h, w = maps.shape
    flat = maps.reshape(-1)
    if above is None:
        index = np.flatnonzero(maps > floor[None, :, None, None])
    else:
        index = as_numpy(above)
        index = index[flat[index] > floor[(index // (h * w)) % units]]
    if not grow or index.size == 0:
        return index, index
    y, x = (index // w) % h, index % w
    mark = np.zeros(flat.size, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            ok = (y + dy >= 0) & (y + dy < h) & (x + dx >= 0) & (x + dx < w)
            mark[index[ok] + dy * w + dx] = True
    return index, np.flatnonzero(mark)


def _replay(
    log: BatchLog,
    layers: Sequence[str],
    shapes: Mapping[str, tuple],
    samples: int,
    batch_size: int,
    device: torch.device | str,
    part: int = 0,
    parts: int = 1,
):
    """``make_batches`` for :func:`nethook.runner.run_batches`: pass 1's records as batches.

    Each layer's maps are rebuilt from the recorded cells, every other cell set to the
    unit's floor; ``data`` holds the stacked labels and thumbnails, and ``cells`` (per
    layer, the flat indices of the cells above the floor: the only ones that can
    reach a threshold, so the only ones pass 2 compares). With ``parts``, only the
    batches whose number is ``part`` modulo ``parts``.
    """
    from nethook.runner import Batch, shard_batches

    def make_batches(first: int):
        for number in shard_batches(first, -(-samples // batch_size), (part, parts)):
            offset = number * batch_size
            record = log.read(number)
            n = len(record["labels"])
            acts = {}
            for i, layer in enumerate(layers):
                values = record[f"value{i}"]
                maps = np.empty((n, *shapes[layer][1:]), values.dtype)
                maps[...] = record[f"floor{i}"][None, :, None, None]
                maps.reshape(-1)[record[f"index{i}"]] = values
                acts[layer] = torch.from_numpy(maps).to(device)
            if "thumb" in record:  # only the rows of images that may be top images
                thumb = np.zeros((n, *record["thumb"].shape[1:]), np.uint8)
                thumb[record["thumb_rows"]] = record["thumb"]
                record["thumb"] = thumb
            data = {
                name: torch.from_numpy(record[name]).to(device)
                for name in ("labels", "image_labels", "thumb")
                if name in record
            }
            data["cells"] = {
                layer: record[f"index{i}"][record[f"hot{i}"]]
                if f"hot{i}" in record
                else record[f"index{i}"]
                for i, layer in enumerate(layers)
            }
            positions = torch.arange(offset, offset + n)
            yield Batch(acts, data, positions, offset, number)

    return make_batches


def _merge_parts(run_part: Callable[[int], None], consumers: Mapping[str, Any], parts: int) -> None:
    """A pass split over ``parts`` processes: ``run_part(part)`` feeds ``consumers``
    every ``parts``-th batch (from the model, or the log); the other processes'
    states are then merged into this one's consumers (sketches and top images
    merge, IoU tallies add, galleries fill their slots). The caller saves the
    finished state.
    """

    def part_states(part: int) -> dict[str, Any] | None:
        run_part(part)  # the other processes send their states here
        return {name: c.state_dict() for name, c in consumers.items()} if part else None

    for states in in_parallel(part_states, parts)[1:]:
        for name, state in states.items():
            consumers[name].merge_state(state)


def _processes(parallel: int | None, on_cpu: bool, num_workers: int, batches: int) -> int:
    """How many processes share each pass (see :func:`dissect`'s ``parallel``)."""
    if parallel is not None and (int(parallel) != parallel or parallel < 1):
        raise ValueError(f"parallel must be a count of processes >= 1 (or None), got {parallel}")
    if not on_cpu:
        if parallel not in (None, 1):
            raise ValueError("parallel processes split CPU runs; on an accelerator use 1 (or None)")
        return 1
    if parallel is None:
        parallel = 1 if num_workers else min(cpu_cores(), _MAX_PROCESSES)
    elif parallel > 1 and num_workers:
        raise ValueError(
            f"parallel={parallel} with num_workers={num_workers}: each process of a split "
            "run loads its own batches; use num_workers=0 (or parallel=1)"
        )
    return max(1, min(int(parallel), batches))


def _part_name(name: str, part: int, parts: int) -> str:
    """Checkpoint file of one process's part of a pass (``name.npz`` when unsplit)."""
    return f"{name}.npz" if parts == 1 else f"{name}.{part}of{parts}.npz"


def _part_desc(desc: str, parts: int) -> str:
    """A progress bar's label: the first process shows its own share."""
    return desc if parts == 1 else f"{desc} (process 1 of {parts})"


class _IoUTally:
    """Tally IoU of every unit of several layers against the labels, in one stat.

    The layers' units sit side by side along the stat's unit axis, so the labels of
    a batch are prepared once for all layers. On CPU only the on entries of the
    masks are found (:class:`~nethook.upsample.ThresholdedUpsample`, around the
    cells that reach the threshold) and tallied (:meth:`IoU.update_flat`); elsewhere
    (``dense``) the maps are upsampled and thresholded into one ``[N, U, H, W]`` mask
    tensor. Reads a source's batch or the labels a store replays (see
    :func:`batch_labels`). Checkpointable through the stat.
    """

    dense: bool | None = None  # None: dense on accelerators, sparse on CPU

    def __init__(
        self,
        stat: IoU,
        layers: list[str],
        prepare,
        thresholds,
        geometry,
        input_size: tuple[int, int],
    ):
        self.stat = stat
        self.layers = tuple(layers)
        self.prepare = prepare
        self.thresholds = thresholds
        self.geometry = geometry
        self.input_size = tuple(input_size)
        self._upsamplers: dict[tuple, ThresholdedUpsample] = {}

    def __call__(self, batch) -> None:
        labels, image_labels = batch_labels(batch.data, self.input_size)
        acts = {layer: self.prepare[layer](batch.acts[layer]) for layer in self.layers}
        dense = self.dense
        if dense is None:
            dense = next(iter(acts.values())).device.type != "cpu"
        if dense:
            self._dense(acts, labels, image_labels)
        else:
            cells = batch.data.get("cells") if isinstance(batch.data, Mapping) else None
            self._sparse(acts, labels, image_labels, cells or {})

    def _sparse(
        self,
        acts,
        labels: torch.Tensor,
        image_labels: torch.Tensor | None,
        cells: Mapping[str, np.ndarray],
    ) -> None:
        label_size = tuple(labels.shape[-2:])
        found: list[np.ndarray] = []
        offset = 0
        for layer in self.layers:
            maps = acts[layer].detach().numpy()
            key = (layer, maps.shape[-2:], label_size)
            if key not in self._upsamplers:
                self._upsamplers[key] = ThresholdedUpsample(
                    maps.shape[-2:], label_size, self.input_size, self.geometry[layer]
                )
            found.append(
                self._upsamplers[key].flat_on(
                    maps,
                    self.thresholds[layer].cpu().numpy(),
                    units=self.stat.num_units,
                    offset=offset,
                    cells=cells.get(layer),
                )
            )
            offset += maps.shape[1]
        self.stat.update_flat(np.concatenate(found), labels, image_labels)

    def _dense(self, acts, labels: torch.Tensor, image_labels: torch.Tensor | None) -> None:
        label_size = tuple(labels.shape[-2:])
        first = next(iter(acts.values()))
        masks = torch.zeros(
            (first.shape[0], self.stat.num_units, *label_size),
            dtype=torch.bool,
            device=first.device,
        )
        offset = 0
        for layer in self.layers:
            units = acts[layer].shape[1]
            threshold_maps(
                masks[:, offset : offset + units],
                acts[layer],
                self.thresholds[layer],
                self.input_size,
                self.geometry[layer],
            )
            offset += units
        device = masks.device
        self.stat.update(
            masks,
            labels.to(device),
            None if image_labels is None else image_labels.to(device),
        )

    def state_dict(self) -> dict[str, Any]:
        return self.stat.state_dict()

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.stat.load_state_dict(sd)

    def merge_state(self, sd: dict[str, Any]) -> None:
        """Add the tallies of another part of the images (a state of this tally)."""
        self.stat.merge(from_state_dict(sd))


def batch_labels(
    data: Mapping[str, Any], input_size: tuple[int, int], dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch's pixel labels ``[N, L, H, W]`` and whole-image labels ``[N, K]`` (or None).

    ``data`` is a concept source's batch (``labels`` and ``image_labels`` map each
    category to ``[N, 1, H, W]`` / ``[N, k]`` ids; without pixel labels, one layer of
    zeros at ``input_size``) or what :class:`_Recorder` stored (already stacked).
    A source's ids are cast to ``dtype`` when given (before stacking: fewer bytes).
    """
    labels = data["labels"]
    image_labels = data.get("image_labels")
    if isinstance(labels, torch.Tensor):
        return labels, image_labels
    parts = [_cast(t if t.ndim == 4 else t[:, None], dtype) for t in labels.values()]
    n = len(data["image"]) if "image" in data else len(data["index"])
    zeros = torch.zeros((n, 1, *input_size), dtype=dtype or torch.int64)
    stacked = torch.cat(parts, 1) if parts else zeros
    whole = [_cast(t, dtype) for t in (image_labels or {}).values()]
    return stacked, torch.cat(whole, 1) if whole else None


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``t`` in ``dtype`` (numpy's cast on CPU: several times faster than torch's here)."""
    if dtype is None or t.dtype == dtype:
        return t
    if t.device.type == "cpu":
        return torch.from_numpy(t.numpy().astype(torch.empty(0, dtype=dtype).numpy().dtype))
    return t.to(dtype)


def thumbnails(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[N, 3, H, W]`` images in [0, 1] as uint8 ``[N, h, w, 3]`` thumbnails of ``size``."""
    import torch.nn.functional as F

    images = images.detach().float()
    if tuple(images.shape[-2:]) != tuple(size):
        images = F.interpolate(
            images, size=size, mode="bilinear", antialias=True, align_corners=False
        )
    return image_bytes(images)


def image_bytes(images: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` images in [0, 1] (clipped) as uint8 ``[N, H, W, 3]``, rounded."""
    images = images.detach().float()
    if images.device.type == "cpu":  # numpy's elementwise kernels: faster here
        pixels = np.rint(np.clip(images.numpy() * np.float32(255), 0, 255)).astype(np.uint8)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 2, 3, 1)))
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def _label_dtype(top: int) -> torch.dtype:
    """The narrowest integer dtype that holds concept ids ``0 .. top``."""
    return torch.uint8 if top < 2**8 else torch.int16 if top < 2**15 else torch.int32


class _Recorder:
    """What pass 1 stores beside the activations so that pass 2 needs no source.

    Per image: the stacked pixel labels (``labels``) and the whole-image labels
    (``image_labels``, when the source has any) in the narrowest integer dtype that
    holds the concept ids. ``thumb`` is the size of gallery thumbnails (None: none),
    which :class:`_HotRecorder` makes of the images it keeps.
    """

    def __init__(
        self,
        concepts: pd.DataFrame,
        input_size: tuple[int, int],
        thumb: tuple[int, int] | None,
    ):
        self.top = int(concepts["id"].max()) if len(concepts) else 0
        self.dtype = _label_dtype(self.top)
        self.input_size = input_size
        self.thumb = thumb

    def __call__(self, batch) -> dict[str, torch.Tensor]:
        data = batch.data
        for name in ("labels", "image_labels"):
            given = data.get(name)
            given = given.values() if isinstance(given, Mapping) else [given] * (given is not None)
            for ids in given:
                values = ids.numpy() if ids.device.type == "cpu" else ids  # numpy: faster
                if ids.numel() and (int(values.max()) > self.top or int(values.min()) < 0):
                    raise ValueError(
                        f"the source's {name} hold concept ids outside its concept table "
                        f"(0..{self.top}): {int(values.min())}..{int(values.max())}"
                    )
        labels, image_labels = batch_labels(data, self.input_size, self.dtype)
        out = {"labels": labels}
        if image_labels is not None:
            out["image_labels"] = image_labels
        return out


def threshold_maps(
    out: torch.Tensor,
    acts: torch.Tensor,
    threshold: torch.Tensor,
    input_size: tuple[int, int],
    geometry: Geometry | None,
) -> torch.Tensor:
    """Write ``upsample(acts) >= threshold`` into the zeroed bool ``out`` ``[N, U, H, W]``.

    Upsampling is a convex combination of the cells, so a map is never above its peak
    cell: only the (image, unit) maps whose peak reaches the threshold (with a margin
    for rounding) are upsampled and compared; the others stay all off. With a top
    quantile of 0.5% that skips most maps, and the masks are the same as thresholding
    every upsampled map (each map is interpolated by itself, bit for bit).
    """
    size = tuple(out.shape[-2:])
    thr = threshold.to(acts.device, acts.dtype)
    if is_identity(tuple(acts.shape[-2:]), size, input_size, geometry):
        _greater_equal(acts, thr[None, :, None, None], out)
        return out
    candidates = torch.ones(acts.shape[:2], dtype=torch.bool, device=acts.device)
    if acts.is_floating_point():
        peak = acts.flatten(2).amax(2).double()
        margin = max(1e-5, 4 * torch.finfo(acts.dtype).eps)
        candidates = ~(peak + peak.abs() * margin < thr.double()[None, :])
    images, units = torch.nonzero(candidates, as_tuple=True)
    if len(images) == 0:
        return out
    maps = upsample(acts[images, units][None], size, input_size, geometry)[0]
    out[images, units] = maps >= thr[units][:, None, None]
    return out


def _greater_equal(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``out[...] = a >= b`` (numpy kernels on CPU, several times faster than torch's)."""
    if a.device.type == "cpu" and a.dtype != torch.bfloat16:
        np.greater_equal(a.detach().numpy(), b.detach().numpy(), out=out.numpy())
    else:
        out.copy_(a >= b)


def dissect(
    model: nn.Module | str,
    layers: str | Sequence[str],
    source: Any,
    *,
    out: str | Path | None = None,
    weights: str | Path | None = None,
    quantile: float = DEFAULT_QUANTILE,
    min_iou: float = DEFAULT_MIN_IOU,
    batch_size: int = 32,
    samples: int | None = None,
    topk: int = 5,
    gallery_size: int | None = 64,
    rotate: float | None = None,
    seed: int = 0,
    geometry: Mapping[str, Geometry] | None = None,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    parallel: int | None = None,
    checkpoint_every: int = 20,
    progress: bool = True,
    pass2: str = "store",
) -> dict[str, xr.Dataset]:
    """Dissect ``layers`` of ``model`` on the concept ``source``; return one dataset per layer.

    ``model`` is an ``nn.Module`` or a :func:`nethook.load_model` spec (with
    ``weights``), ``source`` a concept source or a plugin spec such as
    ``"scenes:n=2000,size=64,seed=0"``. Per unit: the activation threshold at the
    top ``quantile`` (over all positions of all images), the IoU of its upsampled,
    thresholded map with every concept (category-conditioned), its best concept,
    and whether it is a detector (IoU > ``min_iou``). ``rotate=alpha`` dissects the
    layer in a random basis ``Q**alpha`` (seeded by ``seed``; thesis §3.3.2).
    ``geometry`` overrides the receptive-field geometry per layer (default: inferred
    where possible, else uniform). Top ``topk`` images per unit are kept, with
    thumbnails and masks at ``gallery_size`` pixels (``None``: no thumbnails).

    ``pass2="store"`` (default) records in pass 1, to a temporary batch log
    (``out/checkpoints/pass1.log``, or a temporary directory without ``out``), every
    activation above its unit's running floor (a few percent of them; the floor stays
    below the final threshold) with its neighbourhood, the concept labels and the
    thumbnails of the images that may be top images; pass 2 rebuilds the masks from them, with no second rendering or
    forward pass and the same results as ``pass2="recompute"``, which runs the source
    and model again. The log is removed once the dissection succeeds.

    The thresholds come from a :class:`~nethook.stats.TopQuantile` sketch of every
    position of every image; it keeps only the values that can still be in the top
    ``1.1 * quantile`` (a few percent of them), so its rank error is a small
    fraction of that top share.

    On CPU both passes are split over ``parallel`` processes (default: one per core,
    at most 8; with ``num_workers`` loader processes, 1), each taking every
    ``parallel``-th batch with one torch thread; their sketches, tallies and
    galleries are merged after each pass. Results depend (within the sketch's
    error) on ``parallel``, which is part of the run's key.

    With ``out``, results go to ``out/results.zarr``, ``results.json`` and
    ``results.csv``, and both passes checkpoint to ``out/checkpoints/``: a killed
    dissection rerun with the same arguments resumes where it stopped.
    """
    from nethook.hashing import content_key, hash_model
    from nethook.layers import resolve_layers
    from nethook.models import load_model
    from nethook.plugins import get_source
    from nethook.runner import Checkpoint, run, run_batches
    from nethook.stats.topk import TopK

    model_spec = model if isinstance(model, str) else type(model).__name__
    source_spec = source if isinstance(source, str) else type(source).__name__
    if isinstance(model, str):
        model = load_model(model, weights=weights)
    if isinstance(source, str):
        source = get_source(source)
    layers = [layers] if isinstance(layers, str) else list(layers)
    if not layers:
        raise ValueError("layers is empty: name at least one layer to dissect")
    layers = list(resolve_layers(model, layers))
    if not 0.0 < quantile < 0.5:
        raise ValueError(f"quantile must be a top share in (0, 0.5), got {quantile}")
    if rotate is not None and not 0.0 <= rotate <= 1.0:
        raise ValueError(f"rotate (alpha) must lie in [0, 1], got {rotate}")
    if pass2 not in PASS2_MODES:
        raise ValueError(f"pass2 must be one of {PASS2_MODES}, got {pass2!r}")
    model.eval()
    if device is not None:
        model.to(device)
    n = len(source) if samples is None else min(int(samples), len(source))
    on_cpu = torch.device(device or model_device(model)).type == "cpu"
    parts = _processes(parallel, on_cpu, num_workers, -(-n // batch_size))
    concepts = source.concepts()
    ckpt_dir = Path(out) / "checkpoints" if out is not None else None
    if ckpt_dir is not None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    model_hash = hash_model(model)
    key = content_key(
        model=model_hash,
        source=source.fingerprint(),
        layers=layers,
        samples=n,
        quantile=quantile,
        rotate=rotate,
        seed=seed,
        batch_size=batch_size,
        layout=_LAYOUT,
        parts=parts,
    )
    common = dict(
        batch_size=batch_size,
        samples=n,
        num_workers=num_workers,
        device=device,
        checkpoint_every=checkpoint_every,
    )

    first = source[0]
    shapes = _layer_shapes(model, layers, source, first, device)
    prepare = {layer: _preparer(layer, shapes[layer], rotate, seed) for layer in layers}

    input_size = tuple(first["image"].shape[-2:])
    thumb = _thumb_size(input_size, gallery_size) if gallery_size else None
    key2 = content_key(pass1=key, pass2=pass2)
    for pattern, wanted in (("pass1*.npz", key), ("pass2*.npz", key2)):
        _discard_other_run(ckpt_dir, pattern, wanted)
    requested = pass2
    if pass2 == "store" and _checkpoint_complete(ckpt_dir, "pass2.npz", key2, n, batch_size):
        pass2 = "recompute"  # a finished pass 2 needs no store (only its gallery renders)

    # Pass 1: thresholds (top quantile over every position of every image) and top images.
    geometries = {
        layer: (geometry or {}).get(layer) or infer_geometry(model, layer) for layer in layers
    }
    pass1: dict[str, Any] = {}
    for layer in layers:
        positions = n * int(np.prod(shapes[layer][2:]))
        per_batch = batch_size * int(np.prod(shapes[layer][2:]))
        sketch = TopQuantile(
            share=quantile,
            total=positions,
            margin=1.1,
            seed=seed,
            warmup=(_HotRecorder.lag + 1) * per_batch,  # the first floor from 4 batches
        )
        pass1[layer] = _LayerPass1(layer, prepare[layer], sketch, TopK(topk))
    scratch = None
    log = None
    if pass2 == "store":
        if ckpt_dir is None:
            scratch = Path(tempfile.mkdtemp(prefix="nethook-dissect-"))
        log = BatchLog((ckpt_dir or scratch) / "pass1.log", key)

    def run_model(consumers: dict[str, Any], name: str, run_key: str, desc: str, part: int):
        """The model over part ``part``'s batches into ``consumers``, checkpointed as ``name``."""
        run(
            model,
            source,
            consumers,
            checkpoint=ckpt_dir / _part_name(name, part, parts) if ckpt_dir else None,
            checkpoint_key=run_key,
            desc=_part_desc(desc, parts),
            progress=progress and part == 0,
            shard=(part, parts) if parts > 1 else None,
            **common,
        )

    def pass1_part(part: int) -> None:
        """Pass 1 over this part's batches."""
        consumers = dict(pass1)
        if log is not None:
            record = _Recorder(concepts, input_size, thumb)
            consumers["record"] = _HotRecorder(log, pass1, geometries, record, (part, parts))
        run_model(consumers, "pass1", key, "dissect 1/2: thresholds", part)

    try:
        _merge_parts(pass1_part, pass1, parts)
        thresholds = {layer: _threshold(pass1[layer].sketch, quantile) for layer in layers}

        # Pass 2: IoU of every unit's thresholded, upsampled map with every concept.
        units = [shapes[layer][1] for layer in layers]
        # the log holds prepared (rotated) maps: pass 2 takes them as they are
        prepared = prepare if log is None else dict.fromkeys(layers, _identity)
        tally = _IoUTally(
            IoU(sum(units), concepts), layers, prepared, thresholds, geometries, input_size
        )
        tops = {layer: _top(pass1[layer].top) for layer in layers}
        consumers2: dict[str, Any] = {"iou": tally}
        if thumb is not None:
            indices = {layer: tops[layer][1] for layer in layers}
            consumers2["gallery"] = _Gallery(
                indices, prepared, thresholds, geometries, thumb, input_size
            )
        checkpoint2 = ckpt_dir / "pass2.npz" if ckpt_dir else None
        desc2 = "dissect 2/2: IoU"

        def pass2_part(part: int) -> None:
            """Pass 2 over this part's batches (on CPU, split over the processes)."""
            if log is not None:
                run_batches(
                    _replay(log, layers, shapes, n, batch_size, "cpu", part, parts),
                    consumers2,
                    total=n,
                    batch_size=batch_size,
                    progress=progress and part == 0,
                    desc=_part_desc(desc2, parts),
                    shard=(part, parts),
                )
            else:  # as long as pass 1: each process checkpoints its part
                run_model(consumers2, "pass2", key2, desc2, part)

        if parts > 1:
            _merge_parts(pass2_part, consumers2, parts)
            if checkpoint2 is not None:  # finished: a rerun skips pass 2
                saved = Checkpoint(checkpoint2, checkpoint_every, key2)
                meta = saved.meta(batch_size, 0, n, consumers2)
                saved.save(
                    meta, -(-n // batch_size), {k: c.state_dict() for k, c in consumers2.items()}
                )
        elif log is not None:
            run_batches(
                _replay(log, layers, shapes, n, batch_size, device or model_device(model)),
                consumers2,
                total=n,
                batch_size=batch_size,
                checkpoint=checkpoint2,
                checkpoint_every=checkpoint_every,
                checkpoint_key=key2,
                progress=progress,
                desc=desc2,
            )
        else:
            run_model(consumers2, "pass2", key2, desc2, 0)
    except BaseException:
        if scratch is not None:
            _rmtree(scratch)
        raise
    # the log is spent: delete it while the results are assembled (on success only,
    # so that a killed run resumes from it)
    cleanup = None
    if log is not None:
        cleanup = threading.Thread(target=_rmtree, args=(scratch or log.path,), daemon=True)
        cleanup.start()
    iou_all = tally.stat.iou_xarray()
    offsets = np.concatenate([[0], np.cumsum(units)])

    results: dict[str, xr.Dataset] = {}
    for layer in layers:
        i = layers.index(layer)
        iou = iou_all.isel(unit=slice(offsets[i], offsets[i + 1]))
        iou = iou.assign_coords(unit=np.arange(units[i]))
        ds = label_units(iou, min_iou)
        ds["iou"] = iou.astype(np.float32)
        ds["threshold"] = ("unit", thresholds[layer].cpu().numpy())
        values, indices = tops[layer]
        ds["top_index"] = (("unit", "rank"), indices)
        ds["top_value"] = (("unit", "rank"), values)
        ds.attrs = {
            "layer": layer,
            "model": model_spec,
            "source": source_spec,
            "source_fingerprint": source.fingerprint(),
            "samples": n,
            "quantile": quantile,
            "min_iou": min_iou,
            "rotate": rotate,
            "seed": seed,
            "pass2": requested,
        }
        results[layer] = ds
    if thumb is not None:
        consumers2["gallery"].finish(model, source, device, batch_size)
        consumers2["gallery"].add_to(results)
    if out is not None:
        save_results(results, out)
    if cleanup is not None:
        cleanup.join()
    return results


PASS2_MODES = ("store", "recompute")
_MAX_PROCESSES = 8
_LAYOUT = 4  # of checkpoints and records: 4 = split passes, warmed-up sketches, safetensors log


def _discard_other_run(ckpt_dir: Path | None, pattern: str, key: str) -> None:
    """Delete the checkpoints ``ckpt_dir/pattern`` that another run wrote (another
    model, source, option or nethook version: their key differs). They cannot be
    resumed, and the results of that run are not in them (they are in ``results.zarr``)."""
    from nethook.runner import load_checkpoint

    for path in [] if ckpt_dir is None else sorted(ckpt_dir.glob(pattern)):
        try:
            other = load_checkpoint(path).get("meta", {}).get("key") != key
        except (OSError, ValueError, KeyError):
            other = True
        if other:
            path.unlink()


def _thumb_size(input_size: tuple[int, int], gallery_size: int) -> tuple[int, int]:
    """Thumbnail (h, w): the image scaled so its longer side is at most ``gallery_size``."""
    h, w = input_size
    scale = min(1.0, gallery_size / max(h, w))
    return (max(1, round(h * scale)), max(1, round(w * scale)))


def _checkpoint_complete(
    ckpt_dir: Path | None, name: str, key: str, samples: int, batch_size: int
) -> bool:
    """Whether ``ckpt_dir/name`` is a finished run's checkpoint with key ``key``."""
    from nethook.runner import load_checkpoint

    if ckpt_dir is None or not (ckpt_dir / name).is_file():
        return False
    saved = load_checkpoint(ckpt_dir / name)
    meta = saved.get("meta", {})
    return (
        meta.get("key") == key
        and int(meta.get("batch_size", -1)) == batch_size
        and int(saved.get("batches_done", 0)) >= -(-samples // batch_size)
    )


def _layer_shapes(
    model: nn.Module, layers: list[str], source, sample: Mapping[str, Any], device
) -> dict[str, tuple]:
    """Shape of each layer's output on one ``sample`` of ``source`` (``[1, C, ...]``)."""
    from nethook.runner import default_inputs
    from nethook.trace import TraceDict

    device = torch.device(device) if device is not None else model_device(model)
    batch = (
        source.collate([sample]) if hasattr(source, "collate") else {"image": sample["image"][None]}
    )
    with torch.no_grad(), TraceDict(model, layers, stop=True) as traces:
        model(default_inputs(source, device)(batch))
    shapes = {}
    for layer in layers:
        act = traces[layer].output
        if not isinstance(act, torch.Tensor) or act.ndim != 4:
            raise ValueError(
                f"layer {layer!r} outputs {type(act).__name__} of shape "
                f"{tuple(getattr(act, 'shape', ()))}; dissection needs conv feature maps "
                "[B, C, H, W]"
            )
        shapes[layer] = tuple(act.shape)
    return shapes


def _threshold(sketch: TopQuantile, quantile: float) -> torch.Tensor:
    """Per-unit ``T_k`` with ``P(a_k > T_k) = quantile``, as float32 ``[U]``.

    Masks are ``a >= T``. Where the top quantile is the unit's minimum (a ReLU unit
    that is zero almost everywhere), ``T`` is moved just above it, so the mask holds
    the positions where the unit is active rather than every position.
    """
    q = [1.0 - quantile]
    t = sketch.quantiles(q)[:, 0].double().cpu()
    low = sketch.min().double().cpu()
    unsure = sketch.uncertain(q)[:, 0].cpu()
    if bool(unsure.any()):  # the sketch dropped values the threshold needs: never expected
        raise RuntimeError(
            f"the threshold sketch cannot certify the top {quantile} of units "
            f"{torch.nonzero(unsure).flatten()[:10].tolist()}: their floor rose above the "
            "threshold (a bug: please report it with the model and source)"
        )
    t = torch.where(t <= low, torch.nextafter(low.float(), torch.tensor(np.inf)).double(), t)
    return t.float()


def _preparer(layer: str, shape: tuple, rotate: float | None, seed: int):
    """The transform applied to a layer's maps before measuring: identity or ``Q**alpha``."""
    if rotate is None:
        return _identity
    return Rotate(shape[1], alpha=rotate, seed=seed)


def _identity(x: torch.Tensor, layer: str | None = None) -> torch.Tensor:
    return x


def _top(stat) -> tuple[np.ndarray, np.ndarray]:
    """``(values, sample indices)``, each ``[U, k]``, from a TopK stat."""
    values, indices = stat.result()
    return np.asarray(values.cpu(), dtype=np.float32), np.asarray(indices.cpu(), dtype=np.int64)


class _Gallery:
    """Thumbnails of each unit's top images with the unit's mask, gathered in passing.

    A consumer of pass 2: the top images are known after pass 1, so each one's
    thumbnail and the unit's map on it are copied when pass 2 meets it (from the
    source's image, or the thumbnail pass 1 stored; no third pass over the images);
    the masks are made from the maps at the end, all at once. Positions it has not
    met (a resumed pass 2 skips the batches before its checkpoint) are rendered by
    :meth:`finish` in a small pass of their own.
    """

    def __init__(
        self,
        top: Mapping[str, np.ndarray],
        prepare: Mapping[str, Callable],
        thresholds: Mapping[str, torch.Tensor],
        geometries: Mapping[str, Geometry | None],
        size: tuple[int, int],
        input_size: tuple[int, int],
    ) -> None:
        self.top = dict(top)
        self.layers = tuple(top)
        self.input_size = tuple(input_size)
        self.prepare = prepare
        self.thresholds = thresholds
        self.geometries = geometries
        self.size = size
        wanted = np.unique(np.concatenate([t.ravel() for t in self.top.values()]))
        self.wanted = wanted[wanted >= 0]
        self.seen = np.zeros(len(self.wanted), dtype=bool)
        self.images = {
            layer: np.zeros((t.size, *size, 3), dtype=np.uint8) for layer, t in self.top.items()
        }
        self.maps: dict[str, np.ndarray] = {}

    def __call__(self, batch, positions: np.ndarray | None = None) -> None:
        pos = batch.positions.cpu().numpy() if positions is None else positions
        keep = np.nonzero(np.isin(pos, self.wanted))[0]
        if len(keep) == 0:
            return
        order = np.argsort(pos[keep], kind="stable")
        keep, kept = keep[order], pos[keep][order]
        self.seen[np.searchsorted(self.wanted, kept)] = True
        if "thumb" in batch.data:
            small = _rows(batch.data["thumb"], keep)
        else:
            images = batch.data["image"]
            small = thumbnails(images[torch.as_tensor(keep).to(images.device)], self.size)
            small = small.cpu().numpy()
        for layer in self.layers:
            slot_pos = self.top[layer].ravel()
            slots = np.nonzero(np.isin(slot_pos, kept))[0]
            if len(slots) == 0:
                continue
            which = np.searchsorted(kept, slot_pos[slots])
            acts = self.prepare[layer](batch.acts[layer])
            if layer not in self.maps:
                self.maps[layer] = np.zeros((slot_pos.size, *acts.shape[2:]), np.float32)
            units = slots // self.top[layer].shape[1]
            self.maps[layer][slots] = _rows(acts, keep[which], units)
            self.images[layer][slots] = small[which]

    def state_dict(self) -> dict[str, Any]:
        """What has been gathered: which top images were met, their thumbnails and maps."""
        return {
            "seen": self.seen.copy(),
            "images": {layer: a.copy() for layer, a in self.images.items()},
            "maps": {layer: a.copy() for layer, a in self.maps.items()},
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.seen = np.array(sd["seen"], bool)
        self.images = {layer: np.array(a) for layer, a in sd["images"].items()}
        self.maps = {layer: np.array(a) for layer, a in sd.get("maps", {}).items()}

    def merge_state(self, sd: dict[str, Any]) -> None:
        """Take the top images another part of the images met (a state of this gallery)."""
        met = self.wanted[np.asarray(sd["seen"], bool)]
        for layer in self.layers:
            slots = np.isin(self.top[layer].ravel(), met)
            self.images[layer][slots] = np.asarray(sd["images"][layer])[slots]
            if layer in sd.get("maps", {}):
                theirs = np.asarray(sd["maps"][layer])
                if layer not in self.maps:
                    self.maps[layer] = np.zeros_like(theirs)
                self.maps[layer][slots] = theirs[slots]
        self.seen |= np.asarray(sd["seen"], bool)

    def finish(self, model: nn.Module, source, device, batch_size: int) -> None:
        """Render the top images that pass 2 did not meet (only after a resume)."""
        from torch.utils.data import Subset

        from nethook.runner import FunctionConsumer, default_inputs, run

        missing = self.wanted[~self.seen]
        if len(missing) == 0:
            return
        run(
            model,
            Subset(source, missing.tolist()),
            FunctionConsumer(
                lambda batch: self(batch, missing[batch.positions.cpu().numpy()]), self.layers
            ),
            batch_size=batch_size,
            collate_fn=source.collate,
            inputs=default_inputs(source, device),
            device=device,
            progress=False,
        )

    def add_to(self, results: dict[str, xr.Dataset]) -> None:
        """Store ``top_image`` and ``top_mask`` (the maps thresholded) in every layer's dataset."""
        for layer, ds in results.items():
            units, k = self.top[layer].shape
            masks = np.zeros((units * k, *self.size), dtype=bool)
            if layer in self.maps:
                up = upsample(
                    torch.from_numpy(self.maps[layer])[:, None],
                    self.size,
                    self.input_size,
                    self.geometries[layer],
                )[:, 0]
                thr = self.thresholds[layer].cpu().float().repeat_interleave(k)
                masks = (up >= thr[:, None, None]).numpy()
                masks &= (self.top[layer].ravel() >= 0)[:, None, None]
            ds["top_image"] = (
                ("unit", "rank", "y", "x", "rgb"),
                self.images[layer].reshape(units, k, *self.size, 3),
            )
            ds["top_mask"] = (("unit", "rank", "y", "x"), masks.reshape(units, k, *self.size))


def _rows(t: torch.Tensor, *index: np.ndarray) -> np.ndarray:
    """``t[index]`` as a numpy array (numpy's indexing on CPU: torch's is far slower)."""
    if t.device.type == "cpu":
        return t.detach().numpy()[index]
    return t[tuple(torch.as_tensor(i, device=t.device) for i in index)].cpu().numpy()


def rotation_sweep(
    model: nn.Module | str,
    layers: str | Sequence[str],
    source: Any,
    alphas: Sequence[float] = (0.0, 0.5, 1.0),
    *,
    weights: str | Path | None = None,
    **kwargs: Any,
) -> pd.DataFrame:
    """Interpretability against the rotation of the basis (thesis §3.3.2).

    Dissects ``layers`` once per ``alpha`` in the basis ``Q**alpha`` (same seed, so
    the same ``Q``) and returns one row per (layer, alpha): columns ``layer``,
    ``alpha``, ``unique`` (unique detectors), ``detectors`` and ``mean_iou`` (mean
    best IoU over units). ``kwargs`` go to :func:`dissect` (no galleries are made).
    """
    from nethook.models import load_model
    from nethook.plugins import get_source

    if isinstance(model, str):
        model = load_model(model, weights=weights)
    if isinstance(source, str):
        source = get_source(source)
    kwargs = {**kwargs, "gallery_size": None, "out": None, "topk": 1}
    rows = []
    for alpha in alphas:
        results = dissect(model, layers, source, rotate=float(alpha), **kwargs)
        for layer, ds in results.items():
            rows.append(
                {
                    "layer": layer,
                    "alpha": float(alpha),
                    "unique": sum(unique_detectors(ds).values()),
                    "detectors": int(ds["detector"].values.sum()),
                    "mean_iou": float(ds["label_iou"].values.mean()),
                }
            )
    return pd.DataFrame(rows, columns=["layer", "alpha", "unique", "detectors", "mean_iou"])
