"""GAN Dissection: label the units of a generator layer with the concepts they draw.

(thesis ch. 4 and app. A; ``shared/METHODS.md`` section 2.) The generator
``G: z -> x`` is split at ``layer``: ``r = h(z)``, ``x = f(r)``. A segmenter labels
every generated image. For each unit ``u`` and concept ``c`` the unit's feature
map, upsampled to the label resolution, is thresholded at ``t_{u,c}``, the
threshold maximizing the information quality ratio ``I(M; s_c) / H(M, s_c)``, and
scored by ``IoU_{u,c} = E|M ∧ s_c| / E|M ∨ s_c|`` over all generated pixels.

Two samples of z (two seeds) keep estimation and reporting apart:

1. *estimation sample*: one pass tallies the per-unit activation distribution
   (:class:`~nethook.stats.quantile.Quantile`) and its distribution where each
   concept is present (:class:`~nethook.stats.compose.Conditional` of Quantiles)
   plus each concept's pixel share. For ~100 candidate thresholds per unit (levels
   of the overall distribution) the 2 x 2 joint of (mask, concept) follows from
   these sketches, hence ``I / H`` for every (unit, concept, candidate), and the
   best candidate becomes ``t_{u,c}``.
2. *report sample*: one pass counts, exactly, ``|M|``, ``|s_c|`` and ``|M ∧ s_c|``
   at those thresholds (:class:`ThresholdedIoU`), and keeps each unit's
   top-activating samples (:class:`~nethook.stats.topk.TopK`) for the galleries.

The result is a *dissection dataset* as :mod:`nethook.dissect` defines it (so
``save_results`` and the HTML report apply), with per-concept thresholds:

=======================  ==================  =========================================
variable                 dims                meaning
=======================  ==================  =========================================
``iou``                  unit, concept       IoU on the report sample
``concept_threshold``    unit, concept       ``t_{u,c}`` (from the estimation sample)
``iqr``                  unit, concept       ``I / H`` at ``t_{u,c}`` (estimation sample)
``threshold``            unit                ``t_{u,c}`` of the unit's label
``label`` ...            unit                as in :func:`nethook.dissect.label_units`
``top_index``            unit, rank          report-sample indices of top activations
``top_value``            unit, rank          the unit's peak activation on them
``top_image``            unit, rank, y, x, rgb   thumbnails (uint8), optional
``top_mask``             unit, rank, y, x    the unit's mask at ``threshold``, optional
=======================  ==================  =========================================
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr
from torch import nn
from tqdm.auto import tqdm

from nethook.dissect import label_units
from nethook.sources import Segmenter
from nethook.stats.compose import Conditional
from nethook.stats.quantile import Quantile
from nethook.stats.topk import TopK
from nethook.trace import Trace
from nethook.upsample import upsample

DEFAULT_MIN_IOU = 0.05
DEFAULT_GALLERY = 8

__all__ = [
    "DEFAULT_MIN_IOU",
    "GeneratedBatch",
    "LayerDistribution",
    "ThresholdedIoU",
    "candidate_levels",
    "check_feature_map",
    "concept_presence",
    "gandissect",
    "generate",
    "information_quality_ratio",
    "iqr_thresholds",
    "resolve_concepts",
    "sample_z",
]


# ---- inputs ---------------------------------------------------------------------------


def sample_z(generator: nn.Module, n: int, seed: int, device: Any = "cpu") -> torch.Tensor:
    """``n`` standard normal latents for ``generator`` (its ``z_dim``), a function of ``seed``."""
    z_dim = getattr(generator, "z_dim", None)
    if not isinstance(z_dim, int):
        raise ValueError(
            f"generator {type(generator).__name__} has no integer attribute z_dim; "
            "set generator.z_dim to the latent size it expects"
        )
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(n, z_dim, generator=gen).to(device)


def check_feature_map(output: Any, layer: str) -> torch.Tensor:
    """``output`` if it is a ``[B, C, H, W]`` feature map, else an error naming its shape."""
    if not isinstance(output, torch.Tensor) or output.dim() != 4:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ValueError(
            f"layer {layer!r} outputs {shape}, not a feature map [B, C, H, W]; "
            "GAN dissection needs a convolutional layer of the generator"
        )
    return output


def resolve_concepts(table: pd.DataFrame, names: Sequence[str | int]) -> list[int]:
    """Concept ids for ``names`` (names or ids) in a concept table; unknown ones raise
    an error listing the closest known names."""
    by_name = dict(zip(table["name"].astype(str), table["id"].astype(int), strict=False))
    ids = set(table["id"].astype(int))
    out = []
    for name in names:
        if isinstance(name, (int, np.integer)) or (isinstance(name, str) and name.isdigit()):
            if int(name) in ids:
                out.append(int(name))
                continue
        elif str(name) in by_name:
            out.append(by_name[str(name)])
            continue
        close = difflib.get_close_matches(str(name), list(by_name), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown concept {name!r}: the segmenter does not label it{hint}")
    return out


@dataclass
class GeneratedBatch:
    """One batch through the generator: latents, images, the layer's features and labels."""

    z: torch.Tensor
    images: torch.Tensor
    features: torch.Tensor
    labels: dict[str, torch.Tensor]


def generate(
    generator: nn.Module,
    layer: str,
    z: torch.Tensor,
    segmenter: Segmenter | None = None,
    edit: Callable | None = None,
) -> GeneratedBatch:
    """Run ``generator(z)`` retaining ``layer``'s output (optionally edited by ``edit``,
    any ``edit_output`` such as an intervention) and segment the images."""
    with torch.no_grad(), Trace(generator, layer, edit_output=edit) as tr:
        images = generator(z)
    features = check_feature_map(tr.output, layer)
    labels = segmenter.segment(images) if segmenter is not None else {}
    return GeneratedBatch(z, images, features, labels)


def batches(
    generator: nn.Module,
    layer: str,
    segmenter: Segmenter,
    n: int,
    seed: int,
    batch_size: int,
    device: Any,
    desc: str,
    progress: bool,
) -> Iterator[tuple[int, GeneratedBatch]]:
    """``(offset, batch)`` over ``n`` samples of z drawn with ``seed``."""
    z_all = sample_z(generator, n, seed)
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False)
    for start in range(0, n, batch_size):
        z = z_all[start : start + batch_size].to(device)
        yield start, generate(generator, layer, z, segmenter)
        bar.update(len(z))
    bar.close()


def concept_presence(labels: dict[str, torch.Tensor], num_ids: int) -> torch.Tensor:
    """Bool ``[B*H*W, num_ids]``: which concept ids each pixel carries (column 0 unused).

    ``labels`` is a segmenter's output ``{category: int [B, L, H, W]}``; pixels are
    ordered like :func:`pixels` orders activations.
    """
    layers = [t.reshape(t.shape[0], -1, *t.shape[-2:]) for t in labels.values()]
    ids = torch.cat(layers, dim=1).long()
    b, depth, h, w = ids.shape
    flat = ids.permute(0, 2, 3, 1).reshape(-1, depth)
    if flat.numel() and (flat.min() < 0 or flat.max() >= num_ids):
        raise ValueError(f"segmenter returned concept ids outside [0, {num_ids})")
    out = torch.zeros(flat.shape[0], num_ids, dtype=torch.bool, device=flat.device)
    out.scatter_(1, flat, True)
    out[:, 0] = False
    return out


def pixels(features: torch.Tensor, size: tuple[int, int], image_size: tuple[int, int]):
    """Features ``[B, C, h, w]`` upsampled to ``size`` and flattened to ``[B*H*W, C]``."""
    up = upsample(features.float(), size, image_size)
    return up.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def label_size(labels: dict[str, torch.Tensor], images: torch.Tensor) -> tuple[int, int]:
    """Spatial size of the label maps (the images' size when there are none)."""
    for t in labels.values():
        return tuple(t.shape[-2:])
    return tuple(images.shape[-2:])


# ---- information quality ratio ----------------------------------------------------------


def _plogp(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0.0)


def information_quality_ratio(p_both: np.ndarray, p_mask: np.ndarray, p_label: np.ndarray):
    """``I(M; S) / H(M, S)`` of two binary variables from ``P(M=1, S=1)``, ``P(M=1)``,
    ``P(S=1)`` (broadcasting arrays). 0 where the joint entropy is 0."""
    p11 = np.asarray(p_both, dtype=np.float64)
    p1_ = np.asarray(p_mask, dtype=np.float64)
    p_1 = np.asarray(p_label, dtype=np.float64)
    p10 = np.clip(p1_ - p11, 0, 1)
    p01 = np.clip(p_1 - p11, 0, 1)
    p00 = np.clip(1 - p11 - p10 - p01, 0, 1)
    joint = -(_plogp(p11) + _plogp(p10) + _plogp(p01) + _plogp(p00))
    h_m = -(_plogp(p1_) + _plogp(1 - p1_))
    h_s = -(_plogp(p_1) + _plogp(1 - p_1))
    mutual = np.maximum(h_m + h_s - joint, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(joint > 1e-12, mutual / np.where(joint > 1e-12, joint, 1), 0.0)


def candidate_levels(n: int = 100) -> np.ndarray:
    """~``n`` quantile levels for candidate thresholds: half evenly spread over (0, 1),
    half crowding the top tail (rare concepts need thresholds near the maximum)."""
    even = np.linspace(0.0, 1.0, n // 2 + 2)[1:-1]
    tail = 1 - np.geomspace(0.02, 1e-4, n - n // 2)
    return np.unique(np.concatenate([even, tail]))


class LayerDistribution:
    """Per-unit activation distribution, overall and where each concept is present.

    ``update(acts [N, C], presence [N, K])`` feeds a :class:`Quantile` of all pixels,
    a :class:`Conditional` of Quantiles keyed by concept id, and per-concept pixel
    counts. ``pixel_step > 1`` keeps every ``pixel_step``-th pixel (deterministic
    thinning; thresholds need far fewer pixels than IoU counts).
    """

    def __init__(self, pixel_step: int = 1, k: int = 2048) -> None:
        self.overall = Quantile(k=k)
        self.conditional = Conditional(lambda: Quantile(k=k, tail_k=256))
        self.pixel_step = int(pixel_step)
        self.label_count: np.ndarray | None = None
        self.count = 0

    def update(self, acts: torch.Tensor, presence: torch.Tensor) -> None:
        """Add pixels ``acts [N, C]`` with their concept presence ``[N, K]``."""
        if self.pixel_step > 1:
            acts, presence = acts[:: self.pixel_step], presence[:: self.pixel_step]
        self.overall.update(acts)
        self.conditional.update(acts, presence)
        counts = presence.sum(0).cpu().numpy().astype(np.int64)
        self.label_count = counts if self.label_count is None else self.label_count + counts
        self.count += acts.shape[0]


def iqr_thresholds(
    dist: LayerDistribution, concept_ids: Sequence[int], levels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per (unit, concept) the candidate threshold maximizing ``I/H``, and that ``I/H``.

    Candidates are the overall distribution's quantiles at ``levels``
    (:func:`candidate_levels`). Returns ``(thresholds, iqr)``, each ``[C, K]`` for
    the ``K`` concept ids given; a concept never seen gets threshold ``+inf``, IQR 0.
    """
    levels = candidate_levels() if levels is None else np.asarray(levels)
    cand = dist.overall.quantiles(levels).cpu().numpy().astype(np.float64)  # [C, J]
    cand = np.maximum.accumulate(cand, axis=1)
    p_mask = 1 - dist.overall.cdf(torch.as_tensor(cand)).cpu().numpy()  # [C, J]
    units = cand.shape[0]
    thresholds = np.full((units, len(concept_ids)), np.inf)
    best = np.zeros((units, len(concept_ids)))
    for j, cid in enumerate(concept_ids):
        n_c = (
            0 if dist.label_count is None or cid >= len(dist.label_count) else dist.label_count[cid]
        )
        if n_c == 0 or cid not in dist.conditional:
            continue
        p_label = n_c / dist.count
        inside = 1 - dist.conditional[cid].cdf(torch.as_tensor(cand)).cpu().numpy()
        ratio = information_quality_ratio(p_label * inside, p_mask, p_label)
        pick = ratio.argmax(axis=1)
        thresholds[:, j] = cand[np.arange(units), pick]
        best[:, j] = ratio[np.arange(units), pick]
    return thresholds, best


class ThresholdedIoU:
    """Exact IoU tallies of every unit against every concept at a threshold per pair.

    ``thresholds`` is ``[C, K]`` (unit, concept); a pixel is in unit ``u``'s mask for
    concept ``k`` when its activation is ``> thresholds[u, k]``. Over all pixels of
    all images: ``|M ∧ s|`` (``intersection``), ``|M|`` (``unit_area``) and ``|s|``
    (``label_area``). (The IoU stat of :mod:`nethook.stats.iou` takes one threshold
    per unit; GAN dissection's is per unit and concept, so this small tally does it.)
    """

    def __init__(self, thresholds: np.ndarray, concept_ids: Sequence[int]) -> None:
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.concept_ids = list(concept_ids)
        c, k = self.thresholds.shape
        self.intersection = np.zeros((c, k), dtype=np.int64)
        self.unit_area = np.zeros((c, k), dtype=np.int64)
        self.label_area = np.zeros(k, dtype=np.int64)

    def update(self, acts: torch.Tensor, presence: torch.Tensor) -> None:
        """Add pixels ``acts [N, C]`` with concept presence ``[N, num_ids]``."""
        a = acts.detach().float().cpu().numpy()
        cols = presence[:, self.concept_ids].cpu().numpy()
        ordered = np.sort(np.ascontiguousarray(a.T), axis=1)  # [C, N]
        n = a.shape[0]
        thr = self.thresholds.astype(np.float32)
        for u in range(a.shape[1]):
            self.unit_area[u] += n - np.searchsorted(ordered[u], thr[u], side="right")
        self.label_area += cols.sum(0)
        for j in np.flatnonzero(cols.any(0)):
            rows = a[cols[:, j]]
            self.intersection[:, j] += (rows > thr[:, j]).sum(0)

    def iou(self) -> np.ndarray:
        """``[C, K]`` IoU (0 where the union is empty)."""
        union = self.unit_area + self.label_area[None, :] - self.intersection
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, self.intersection / np.maximum(union, 1), 0.0)


# ---- the pipeline -------------------------------------------------------------------------


def _concept_table(segmenter: Segmenter, concepts: Sequence[str | int] | None) -> pd.DataFrame:
    table = segmenter.concepts()
    if concepts:
        keep = resolve_concepts(table, concepts)
        table = table[table["id"].isin(keep)].reset_index(drop=True)
    return table


def gandissect(
    generator: nn.Module,
    layer: str,
    segmenter: Segmenter,
    *,
    n: int = 1000,
    n_report: int | None = None,
    seed: int = 0,
    report_seed: int | None = None,
    concepts: Sequence[str | int] | None = None,
    batch_size: int = 50,
    levels: np.ndarray | None = None,
    pixel_step: int = 8,
    min_iou: float = DEFAULT_MIN_IOU,
    gallery: int = DEFAULT_GALLERY,
    thumbnail: int = 64,
    device: Any = None,
    progress: bool = True,
) -> xr.Dataset:
    """Dissect ``layer`` of ``generator`` with ``segmenter`` (see the module docstring).

    ``n`` samples of z (``seed``) estimate the thresholds; ``n_report`` (default
    ``n``) other samples (``report_seed``, default ``seed + 1``) give the IoUs and
    galleries of ``gallery`` top images per unit, as ``thumbnail``-pixel squares
    (0: none). ``concepts`` restricts the concepts (names or ids). ``pixel_step``
    thins the pixels of the estimation pass. Returns the dissection dataset.
    """
    from nethook.layers import resolve_named_layer

    layer, _ = resolve_named_layer(generator, layer)
    device = torch.device(device) if device is not None else _device_of(generator)
    generator.to(device).eval()
    n_report = n if n_report is None else n_report
    report_seed = seed + 1 if report_seed is None else report_seed
    table = _concept_table(segmenter, concepts)
    if table.empty:
        raise ValueError("the segmenter publishes no concepts")
    ids = table["id"].astype(int).tolist()
    num_ids = int(segmenter.concepts()["id"].max()) + 1

    dist = LayerDistribution(pixel_step=pixel_step)
    for _, b in batches(
        generator, layer, segmenter, n, seed, batch_size, device, "gandissect thresholds", progress
    ):
        size = label_size(b.labels, b.images)
        dist.update(
            pixels(b.features, size, b.images.shape[-2:]), concept_presence(b.labels, num_ids)
        )
    thresholds, iqr = iqr_thresholds(dist, ids, levels)

    tally = ThresholdedIoU(thresholds, ids)
    top = TopK(gallery) if gallery else None
    for start, b in batches(
        generator, layer, segmenter, n_report, report_seed, batch_size, device,
        "gandissect iou", progress,
    ):  # fmt: skip
        size = label_size(b.labels, b.images)
        tally.update(
            pixels(b.features, size, b.images.shape[-2:]), concept_presence(b.labels, num_ids)
        )
        if top is not None:
            top.update(b.features.amax(dim=(2, 3)), start)

    units = np.arange(thresholds.shape[0])
    coords = {
        "unit": units,
        "concept": np.asarray(ids, dtype=np.int64),
        "concept_name": ("concept", table["name"].astype(str).to_numpy().astype(object)),
        "concept_category": ("concept", table["category"].astype(str).to_numpy().astype(object)),
    }
    iou = xr.DataArray(tally.iou().astype(np.float32), dims=("unit", "concept"), coords=coords)
    ds = label_units(iou, min_iou)
    ds["iou"] = iou
    ds["concept_threshold"] = (("unit", "concept"), thresholds.astype(np.float32))
    ds["iqr"] = (("unit", "concept"), iqr.astype(np.float32))
    pick = np.searchsorted(np.asarray(ids), ds["label_id"].values)
    ds["threshold"] = ("unit", thresholds[units, pick].astype(np.float32))
    ds["label_area"] = ("concept", tally.label_area / max(n_report, 1))
    ds.attrs.update(
        {
            "layer": layer,
            "model": type(generator).__name__,
            "segmenter": type(segmenter).__name__,
            "samples": n,
            "report_samples": n_report,
            "seed": seed,
            "report_seed": report_seed,
            "min_iou": min_iou,
            "method": "gandissect",
        }
    )
    if top is not None:
        values, indices = top.result()
        ds["top_index"] = (("unit", "rank"), indices.cpu().numpy())
        ds["top_value"] = (("unit", "rank"), values.float().cpu().numpy())
        if thumbnail:
            _add_galleries(generator, layer, ds, report_seed, n_report, thumbnail, device)
    return ds


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _add_galleries(
    generator: nn.Module,
    layer: str,
    ds: xr.Dataset,
    seed: int,
    n: int,
    size: int,
    device: torch.device,
) -> None:
    """Regenerate each unit's top images (z is a function of the seed) with their masks."""
    import torch.nn.functional as F

    top = ds["top_index"].values
    wanted = np.unique(top[top >= 0])
    z = sample_z(generator, n, seed)[torch.as_tensor(wanted)].to(device)
    b = generate(generator, layer, z)
    row = {int(p): i for i, p in enumerate(wanted)}
    thumbs = F.interpolate(b.images.float().clamp(0, 1), size=(size, size), mode="nearest")
    thumbs = (thumbs * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    units, ranks = top.shape
    images = np.zeros((units, ranks, size, size, 3), dtype=np.uint8)
    masks = np.zeros((units, ranks, size, size), dtype=bool)
    image_size = tuple(b.images.shape[-2:])
    for u in range(units):
        which = [row[int(i)] for i in top[u]]
        up = upsample(b.features[which, u : u + 1].float(), (size, size), image_size)[:, 0]
        masks[u] = (up > float(ds["threshold"].values[u])).cpu().numpy()
        images[u] = thumbs[which]
    ds["top_image"] = (("unit", "rank", "y", "x", "rgb"), images)
    ds["top_mask"] = (("unit", "rank", "y", "x"), masks)
