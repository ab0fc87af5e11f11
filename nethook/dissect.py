"""Network Dissection: label every unit of a layer with the concept it detects.

(thesis ch. 3; ``shared/METHODS.md`` section 1). Pass 1 finds each unit's top-quantile
threshold with a :class:`~nethook.stats.quantile.Quantile` sketch; pass 2 tallies the
intersection and union of each unit's thresholded, upsampled activation map with
every concept's label map (:class:`~nethook.stats.iou.IoU`), category-conditioned.
By default pass 1 also records the layers' activations (float32), each image's concept
labels and its gallery thumbnail in a temporary activation store, and pass 2 reads
them back instead of rendering the images and running the model again
(``pass2="recompute"`` does the latter, for runs whose store would not fit on disk).
The top-activating images of each unit are gathered for galleries in passing.

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
from nethook.models import model_device
from nethook.rotation import Rotate
from nethook.stats.iou import IoU
from nethook.stats.quantile import Quantile
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

    The maps are prepared once for both. The sketch sees every position of every
    image, or, when that is more than ``sketch_samples`` values per unit over the
    run, the same ``keep`` positions of each image of a batch, drawn at random
    (seeded by the run's seed and the batch's first sample, so a resumed run draws
    the same). Thinning adds a sampling error to the thresholds' rank of at most
    about ``sqrt(q (1 - q) / sketch_samples)`` (7e-5 at q = 0.005 and the default
    2**20), less than the sketch's own error bound in the tail; it is what keeps the
    sketch's cost from dominating large layers.
    """

    def __init__(
        self,
        layer: str,
        prepare: Callable[[torch.Tensor], torch.Tensor],
        sketch: Quantile,
        top: Any,
        keep: int | None,
        seed: int,
    ):
        self.layer = layer
        self.layers = (layer,)
        self.prepare = prepare
        self.sketch = sketch
        self.top = top
        self.keep = keep
        self.seed = seed

    def __call__(self, batch) -> None:
        acts = self.prepare(batch.acts[self.layer]).detach()
        n, units = acts.shape[:2]
        chosen = None
        if self.keep is not None and self.keep < acts[0, 0].numel():
            rng = np.random.default_rng([self.seed, int(batch.start)])
            chosen = np.sort(rng.choice(acts[0, 0].numel(), self.keep, replace=False))
        if acts.device.type == "cpu":  # numpy's reductions and gathers: faster here
            maps = acts.numpy().reshape(n, units, -1)
            peak = torch.from_numpy(maps.max(2))
            sample = maps if chosen is None else maps[:, :, chosen]
            rows = torch.from_numpy(sample.transpose(0, 2, 1).reshape(-1, units))
        else:
            maps = acts.reshape(n, units, -1)
            peak = maps.amax(2)
            sample = maps if chosen is None else maps[:, :, torch.as_tensor(chosen).to(maps.device)]
            rows = sample.transpose(1, 2).reshape(-1, units)
        self.top.update(peak, batch.positions.to(peak.device))
        self.sketch.update(rows)

    def state_dict(self) -> dict[str, Any]:
        return {"sketch": self.sketch.state_dict(), "top": self.top.state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.sketch.load_state_dict(sd["sketch"])
        self.top.load_state_dict(sd["top"])


def _sketch_keep(positions: int, samples: int, sketch_samples: int | None) -> int | None:
    """Positions per image the threshold sketch sees (None: all of them)."""
    if sketch_samples is None or positions * samples <= sketch_samples:
        return None
    return max(1, -(-int(sketch_samples) // samples))


class _IoUTally:
    """Tally IoU of every unit of several layers against the labels, in one stat.

    The layers' units sit side by side along the stat's unit axis, so the labels of
    a batch are prepared once for all layers. On CPU only the on entries of the
    masks are found (:class:`~nethook.upsample.ThresholdedUpsample`, around the
    cells that reach the threshold) and tallied (:meth:`IoU.update_on`); elsewhere
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
            self._sparse(acts, labels, image_labels)

    def _sparse(self, acts, labels: torch.Tensor, image_labels: torch.Tensor | None) -> None:
        label_size = tuple(labels.shape[-2:])
        found: list[tuple[np.ndarray, ...]] = []
        offset = 0
        for layer in self.layers:
            maps = acts[layer].detach().numpy()
            key = (layer, maps.shape[-2:], label_size)
            if key not in self._upsamplers:
                self._upsamplers[key] = ThresholdedUpsample(
                    maps.shape[-2:], label_size, self.input_size, self.geometry[layer]
                )
            image, unit, pixel = self._upsamplers[key].on(
                maps, self.thresholds[layer].cpu().numpy()
            )
            found.append((image, unit + offset, pixel))
            offset += maps.shape[1]
        image, unit, pixel = (np.concatenate(parts) for parts in zip(*found, strict=True))
        self.stat.update_on(image, unit, pixel, labels, image_labels)

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

    Per image: the stacked pixel labels (``labels``), the whole-image labels
    (``image_labels``, when the source has any) in the narrowest integer dtype that
    holds the concept ids, and the gallery thumbnail (``thumb``, uint8).
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
        if self.thumb is not None:
            out["thumb"] = thumbnails(batch.data["image"], self.thumb)
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
    checkpoint_every: int = 20,
    progress: bool = True,
    pass2: str = "store",
    store_dtype: str = "float32",
    sketch_samples: int | None = 2**20,
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

    ``pass2="store"`` (default) records the layers' activations (in ``store_dtype``),
    the concept labels and the thumbnails in pass 1 to a temporary activation store
    (``out/checkpoints/pass1.zarr``, or a temporary directory without ``out``),
    removed once the dissection succeeds, and pass 2 reads them back: no second
    rendering or forward pass, and the same results as ``pass2="recompute"``, which
    runs the source and model again (for runs whose store would not fit on disk: it
    takes ``samples * (units * cells * 4 + label bytes)`` bytes). A float16 store
    halves that but costs CPU time to convert; both passes then measure the
    float16-rounded activations (thresholds within 5e-4 relative, IoUs within about
    1e-3 of float32's; tested).

    The threshold sketch sees at most about ``sketch_samples`` values per unit (a
    random share of each image's positions when a layer has more; ``None``: all),
    which adds a rank error of about ``sqrt(quantile / sketch_samples)`` (7e-5 by
    default) to the thresholds.

    With ``out``, results go to ``out/results.zarr``, ``results.json`` and
    ``results.csv``, and both passes checkpoint to ``out/checkpoints/``: a killed
    dissection rerun with the same arguments resumes where it stopped.
    """
    from nethook.hashing import content_key, hash_model
    from nethook.layers import resolve_layers
    from nethook.models import load_model
    from nethook.plugins import get_source
    from nethook.runner import StoreWriter, run, run_store
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
    if sketch_samples is not None and int(sketch_samples) < 1:
        raise ValueError(
            f"sketch_samples must be a positive count (or None for all), got {sketch_samples}"
        )
    model.eval()
    if device is not None:
        model.to(device)
    n = len(source) if samples is None else min(int(samples), len(source))
    concepts = source.concepts()
    ckpt_dir = Path(out) / "checkpoints" if out is not None else None
    if ckpt_dir is not None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    precision = store_dtype if pass2 == "store" else None
    model_hash = hash_model(model)
    key = content_key(
        precision=precision,
        model=model_hash,
        source=source.fingerprint(),
        layers=layers,
        samples=n,
        quantile=quantile,
        rotate=rotate,
        seed=seed,
        batch_size=batch_size,
        sketch_samples=sketch_samples,
    )
    common = dict(
        batch_size=batch_size,
        samples=n,
        num_workers=num_workers,
        device=device,
        checkpoint_every=checkpoint_every,
        checkpoint_key=key,
        progress=progress,
    )

    first = source[0]
    shapes = _layer_shapes(model, layers, source, first, device)
    prepare = {layer: _preparer(layer, shapes[layer], rotate, seed, precision) for layer in layers}

    input_size = tuple(first["image"].shape[-2:])
    thumb = _thumb_size(input_size, gallery_size) if gallery_size else None
    key2 = content_key(pass1=key, pass2=pass2)
    requested = pass2
    if pass2 == "store" and _checkpoint_complete(ckpt_dir, "pass2.npz", key2, n, batch_size):
        pass2 = "recompute"  # a finished pass 2 needs no store (only its gallery renders)

    # Pass 1: thresholds (top quantile over every position of every image) and top images.
    pass1: dict[str, Any] = {}
    for layer in layers:
        keep = _sketch_keep(int(np.prod(shapes[layer][2:])), n, sketch_samples)
        pass1[layer] = _LayerPass1(
            layer, prepare[layer], Quantile(seed=seed), TopK(topk), keep, seed
        )
    scratch = None
    if pass2 == "store":
        if ckpt_dir is None:
            scratch = Path(tempfile.mkdtemp(prefix="nethook-dissect-"))
        store_path = (ckpt_dir or scratch) / "pass1.zarr"
        pass1["store"] = StoreWriter(
            store_path,
            layers,
            samples=n,
            dtype=store_dtype,
            block_samples=_block_samples(batch_size, shapes),
            attrs={
                "model": model_spec,
                "model_hash": model_hash,
                "source": source_spec,
                "source_fingerprint": source.fingerprint(),
                "seed": seed,
            },
            sample_data=_Recorder(concepts, input_size, thumb),
        )
    try:
        run(
            model,
            source,
            pass1,
            checkpoint=ckpt_dir / "pass1.npz" if ckpt_dir else None,
            desc="dissect 1/2: thresholds",
            **common,
        )
        thresholds = {layer: _threshold(pass1[layer].sketch, quantile) for layer in layers}

        # Pass 2: IoU of every unit's thresholded, upsampled map with every concept.
        geometries = {
            layer: (geometry or {}).get(layer) or infer_geometry(model, layer) for layer in layers
        }
        units = [shapes[layer][1] for layer in layers]
        tally = _IoUTally(
            IoU(sum(units), concepts), layers, prepare, thresholds, geometries, input_size
        )
        tops = {layer: _top(pass1[layer].top) for layer in layers}
        consumers2: dict[str, Any] = {"iou": tally}
        if thumb is not None:
            indices = {layer: tops[layer][1] for layer in layers}
            consumers2["gallery"] = _Gallery(
                indices, prepare, thresholds, geometries, thumb, input_size
            )
        checkpoint2 = ckpt_dir / "pass2.npz" if ckpt_dir else None
        if pass2 == "store":
            run_store(
                store_path,
                consumers2,
                batch_size=batch_size,
                device=device or model_device(model),
                checkpoint=checkpoint2,
                checkpoint_every=checkpoint_every,
                checkpoint_key=key2,
                progress=progress,
                desc="dissect 2/2: IoU",
            )
        else:
            run(
                model,
                source,
                consumers2,
                checkpoint=checkpoint2,
                desc="dissect 2/2: IoU",
                **{**common, "checkpoint_key": key2},
            )
    except BaseException:
        if scratch is not None:
            _rmtree(scratch)
        raise
    # the store is spent: delete it while the results are assembled (on success only,
    # so that a killed run resumes from it)
    cleanup = None
    if pass2 == "store":
        cleanup = threading.Thread(target=_rmtree, args=(scratch or store_path,), daemon=True)
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
            "precision": precision or "float32",
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


def _block_samples(batch_size: int, shapes: Mapping[str, tuple]) -> int:
    """Samples per block of the pass-1 store: whole batches, about 16 MiB of float32.

    Small blocks keep pass 2's read-ahead (a few blocks of every layer) small.
    """
    per_sample = sum(int(np.prod(shape[1:])) for shape in shapes.values()) * 4
    return batch_size * max(1, (16 << 20) // (per_sample * batch_size))


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


def _threshold(sketch: Quantile, quantile: float) -> torch.Tensor:
    """Per-unit ``T_k`` with ``P(a_k > T_k) = quantile``, as float32 ``[U]``.

    Masks are ``a >= T``. Where the top quantile is the unit's minimum (a ReLU unit
    that is zero almost everywhere), ``T`` is moved just above it, so the mask holds
    the positions where the unit is active rather than every position.
    """
    t = sketch.quantiles([1.0 - quantile])[:, 0].double().cpu()
    low = sketch.min().double().cpu()
    t = torch.where(t <= low, torch.nextafter(low.float(), torch.tensor(np.inf)).double(), t)
    return t.float()


def _preparer(
    layer: str, shape: tuple, rotate: float | None, seed: int, precision: str | None = None
):
    """The transform applied to a layer's maps before measuring: identity or ``Q**alpha``.

    With a ``precision`` (the store's dtype) the maps are first rounded to it, so that
    pass 1 measures exactly the values pass 2 reads back from the store.
    """
    rotation = None if rotate is None else Rotate(shape[1], alpha=rotate, seed=seed)
    if precision in (None, "float32"):
        return rotation or _identity
    return _Rounded(getattr(torch, precision), rotation)


class _Rounded:
    """Round maps to a narrower float dtype (and back), then apply ``then`` if given."""

    def __init__(self, dtype: torch.dtype, then: Callable | None) -> None:
        self.dtype = dtype
        self.then = then

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:
            x = x.to(self.dtype).to(x.dtype)
        return x if self.then is None else self.then(x)


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
