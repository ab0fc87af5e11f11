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
   at those thresholds (:class:`~nethook.stats.pair_iou.PairIoU`), and keeps each
   unit's top-activating samples (:class:`~nethook.stats.topk.TopK`) and their
   images for the galleries (no second generator pass).

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
from scipy.special import xlogy
from torch import nn
from tqdm.auto import tqdm

from nethook.dissect import image_bytes, label_units
from nethook.models import model_device
from nethook.runner import InOrder
from nethook.sources import Segmenter
from nethook.stats.compose import Conditional
from nethook.stats.pair_iou import PairIoU, present_pairs
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
    "candidate_levels",
    "check_feature_map",
    "concept_ids",
    "concept_presence",
    "gandissect",
    "generate",
    "information_quality_ratio",
    "iqr_thresholds",
    "latents",
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
    return latents(n, z_dim, seed).to(device)


def latents(n: int, z_dim: int, seed: int) -> torch.Tensor:
    """``[n, z_dim]`` standard normal latents, a pure function of ``seed`` (on CPU).

    The one seed -> z convention of GAN dissection, ACE and FSD, so a seed names the
    same samples in all of them.
    """
    return torch.randn(n, z_dim, generator=torch.Generator().manual_seed(int(seed)))


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


def concept_ids(labels: dict[str, torch.Tensor], num_ids: int | None = None) -> torch.Tensor:
    """Int64 ``[B*H*W, L]``: the concept ids of every pixel, one column per label layer.

    ``labels`` is a segmenter's output ``{category: int [B, L_c, H, W]}`` (``L`` is the
    sum of the ``L_c``; 0 = no label); pixels are ordered like :func:`pixels` orders
    activations. With ``num_ids``, ids outside ``[0, num_ids)`` are an error.
    """
    layers = [t.reshape(t.shape[0], -1, *t.shape[-2:]) for t in labels.values()]
    if all(t.device.type == "cpu" for t in layers):
        # numpy on CPU: a few single-threaded copies, no thread start-up per small op
        ids = np.concatenate([t.numpy() for t in layers], axis=1).astype(np.int64, copy=False)
        flat = torch.from_numpy(np.ascontiguousarray(ids.transpose(0, 2, 3, 1)))
    else:
        flat = torch.cat(layers, dim=1).long().permute(0, 2, 3, 1)
    flat = flat.reshape(-1, flat.shape[-1])
    if num_ids is not None and flat.numel():
        low, high = torch.aminmax(flat)
        if low < 0 or high >= num_ids:
            raise ValueError(f"segmenter returned concept ids outside [0, {num_ids})")
    return flat


def concept_presence(labels: dict[str, torch.Tensor] | torch.Tensor, num_ids: int) -> torch.Tensor:
    """Bool ``[N, num_ids]``: which concept ids each pixel carries (column 0 unused).

    ``labels`` is a segmenter's output (see :func:`concept_ids`) or its ``[N, L]`` ids.
    """
    flat = labels if isinstance(labels, torch.Tensor) else concept_ids(labels)
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
    """``p log p`` (0 at ``p = 0``), one vectorized pass."""
    return xlogy(p, p)


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
    counts. ``presence`` may also be the ``[N, L]`` concept ids of
    :func:`concept_ids`. ``concepts`` (ids) limits the conditional sketches to those
    concepts (default: every id seen). ``pixel_step > 1`` keeps every
    ``pixel_step``-th pixel (deterministic thinning; thresholds need far fewer
    pixels than IoU counts).

    Each concept's rows are buffered and fed to its sketch in blocks of about
    ``buffer // channels`` rows in all (one sketch update per concept per block
    instead of per batch: most concepts cover few pixels of a batch); call
    :meth:`flush` before reading the sketches (:func:`iqr_thresholds` does).
    """

    def __init__(
        self,
        pixel_step: int = 1,
        k: int = 2048,
        concepts: Sequence[int] | None = None,
        buffer: int = 1 << 23,
    ) -> None:
        self.overall = Quantile(k=k)
        self.conditional = Conditional(lambda: Quantile(k=k, tail_k=256))
        self.pixel_step = int(pixel_step)
        self.concepts = None if concepts is None else {int(c) for c in concepts}
        self.label_count: np.ndarray | None = None
        self.count = 0
        self.buffer = int(buffer)
        self._pending: dict[int, list[torch.Tensor]] = {}
        self._pending_size = 0

    def update(self, acts: torch.Tensor, presence: torch.Tensor) -> None:
        """Add pixels ``acts [N, C]`` with their concept presence ``[N, K]`` (or ids ``[N, L]``)."""
        if self.pixel_step > 1:
            acts, presence = acts[:: self.pixel_step], presence[:: self.pixel_step]
        acts = acts.contiguous()
        self.overall.update(acts)
        width = presence.shape[1] if presence.dtype == torch.bool else _max_id(presence) + 1
        keys = [c for c in range(1, width) if self.concepts is None or c in self.concepts]
        if presence.dtype == torch.bool:
            presence = presence.index_select(1, torch.as_tensor(keys, device=presence.device))
        rows, cols = present_pairs(presence, keys)
        counts = torch.bincount(cols.cpu(), minlength=len(keys)).numpy().astype(np.int64)
        counts = counts[: len(keys)]
        # one gather; each concept's run of rows waits for Conditional's keyed update
        runs = acts.index_select(0, rows.to(acts.device)).split(counts.tolist())
        for key, run in zip(keys, runs, strict=True):
            if len(run):
                self._pending.setdefault(key, []).append(run)
        self._pending_size += len(rows) * acts.shape[1]
        if self._pending_size >= self.buffer:
            self.flush()
        if self.label_count is None:
            self.label_count = np.zeros(0, np.int64)
        if len(self.label_count) < width:
            self.label_count = np.pad(self.label_count, (0, width - len(self.label_count)))
        self.label_count[keys] += counts
        self.count += acts.shape[0]

    def flush(self) -> None:
        """Feed the buffered rows to the conditional sketches."""
        for key, runs in sorted(self._pending.items()):
            self.conditional.update(torch.cat(runs), key)
        self._pending.clear()
        self._pending_size = 0


def _max_id(ids: torch.Tensor) -> int:
    return int(ids.max()) if ids.numel() else 0


def iqr_thresholds(
    dist: LayerDistribution, concept_ids: Sequence[int], levels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per (unit, concept) the candidate threshold maximizing ``I/H``, and that ``I/H``.

    Candidates are the overall distribution's quantiles at ``levels``
    (:func:`candidate_levels`). Returns ``(thresholds, iqr)``, each ``[C, K]`` for
    the ``K`` concept ids given; a concept never seen gets threshold ``+inf``, IQR 0.
    """
    dist.flush()
    levels = candidate_levels() if levels is None else np.asarray(levels)
    cand = dist.overall.quantiles(levels).cpu().numpy().astype(np.float64)  # [C, J]
    cand = np.maximum.accumulate(cand, axis=1)
    p_mask = 1 - dist.overall.cdf(torch.as_tensor(cand)).cpu().numpy()  # [C, J]
    units = cand.shape[0]
    thresholds = np.full((units, len(concept_ids)), np.inf)
    best = np.zeros((units, len(concept_ids)))
    seen, shares, inside = [], [], []
    for j, cid in enumerate(concept_ids):
        n_c = (
            0 if dist.label_count is None or cid >= len(dist.label_count) else dist.label_count[cid]
        )
        if n_c == 0 or cid not in dist.conditional:
            continue
        seen.append(j)
        shares.append(n_c / dist.count)
        inside.append(1 - dist.conditional[cid].cdf(torch.as_tensor(cand)).cpu().numpy())
    if seen:  # I/H of every (concept, unit, candidate) at once
        p_label = np.asarray(shares)[:, None, None]
        ratio = information_quality_ratio(p_label * np.stack(inside), p_mask[None], p_label)
        pick = ratio.argmax(axis=2)  # [seen, C]
        rows = np.arange(units)[None, :]
        thresholds[:, seen] = cand[rows, pick].T
        best[:, seen] = np.take_along_axis(ratio, pick[:, :, None], axis=2)[:, :, 0].T
    return thresholds, best


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
    device = torch.device(device) if device is not None else model_device(generator)
    generator.to(device).eval()
    n_report = n if n_report is None else n_report
    report_seed = seed + 1 if report_seed is None else report_seed
    table = _concept_table(segmenter, concepts)
    if table.empty:
        raise ValueError("the segmenter publishes no concepts")
    ids = table["id"].astype(int).tolist()
    num_ids = int(segmenter.concepts()["id"].max()) + 1

    dist = LayerDistribution(pixel_step=pixel_step, concepts=ids)
    with InOrder() as behind:
        for _, b in batches(
            generator, layer, segmenter, n, seed, batch_size, device, "gandissect thresholds",
            progress,
        ):  # fmt: skip
            size = label_size(b.labels, b.images)
            acts = pixels(b.features, size, b.images.shape[-2:])
            behind.run(dist.update, acts, concept_ids(b.labels, num_ids))
    thresholds, iqr = iqr_thresholds(dist, ids, levels)

    # candidate thresholds are sketch values of float32 activations: exact in float32
    tally = PairIoU(torch.as_tensor(thresholds, dtype=torch.float32), concepts=ids)
    top = TopK(gallery) if gallery else None
    kept = _GalleryImages(thumbnail) if top is not None and thumbnail else None
    with InOrder() as behind:
        for start, b in batches(
            generator, layer, segmenter, n_report, report_seed, batch_size, device,
            "gandissect iou", progress,
        ):  # fmt: skip
            size = label_size(b.labels, b.images)
            acts = pixels(b.features, size, b.images.shape[-2:])
            behind.run(tally.update, acts, concept_ids(b.labels, num_ids))
            if top is not None:
                top.update(b.features.amax(dim=(2, 3)), start)
            if kept is not None:
                kept.update(start, b, top.indices())

    units = np.arange(thresholds.shape[0])
    coords = {
        "unit": units,
        "concept": np.asarray(ids, dtype=np.int64),
        "concept_name": ("concept", table["name"].astype(str).to_numpy().astype(object)),
        "concept_category": ("concept", table["category"].astype(str).to_numpy().astype(object)),
    }
    iou = tally.iou().cpu().numpy().astype(np.float32)
    iou = xr.DataArray(iou, dims=("unit", "concept"), coords=coords)
    ds = label_units(iou, min_iou)
    ds["iou"] = iou
    ds["concept_threshold"] = (("unit", "concept"), thresholds.astype(np.float32))
    ds["iqr"] = (("unit", "concept"), iqr.astype(np.float32))
    pick = np.searchsorted(np.asarray(ids), ds["label_id"].values)
    ds["threshold"] = ("unit", thresholds[units, pick].astype(np.float32))
    ds["label_area"] = ("concept", tally.label_area.cpu().numpy() / max(n_report, 1))
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
        if kept is not None:
            kept.add_to(ds)
    return ds


class _GalleryImages:
    """Images and feature maps of the report sample's current top images, kept as the
    report pass goes (so the galleries need no second generator pass). Images are
    kept as they are when no larger than the thumbnails, else as thumbnails; the few
    small ops per batch matter on a busy CPU."""

    def __init__(self, size: int) -> None:
        self.size = int(size)
        self.images: dict[int, torch.Tensor] = {}
        self.features: dict[int, torch.Tensor] = {}
        self.image_size: tuple[int, int] = (size, size)

    def update(self, start: int, batch: GeneratedBatch, top_index: torch.Tensor) -> None:
        """Keep the images of ``batch`` (sample offset ``start``) that are now among the
        top ones, and forget those that dropped out."""
        wanted = set(top_index.flatten().tolist())
        for i in [i for i in self.images if i not in wanted]:
            del self.images[i], self.features[i]
        new = sorted(i for i in wanted if start <= i < start + len(batch.z))
        if not new:
            return
        rows = torch.as_tensor(new, device=batch.images.device) - start
        images = batch.images.index_select(0, rows)
        self.image_size = tuple(images.shape[-2:])
        if self._shrink():
            images = _thumbnails(images, self.size)
        features = batch.features.index_select(0, rows)
        for j, i in enumerate(new):
            self.images[i], self.features[i] = images[j], features[j]

    def _shrink(self) -> bool:
        """Whether thumbnails are smaller than the images (then they are kept instead)."""
        return self.image_size[0] * self.image_size[1] > self.size**2

    def add_to(self, ds: xr.Dataset) -> None:
        """Add ``top_image`` and ``top_mask`` (each unit's map at its ``threshold``) to ``ds``."""
        top = torch.as_tensor(ds["top_index"].values)
        units, ranks = top.shape
        order = sorted(self.images)
        row = {i: j for j, i in enumerate(order)}
        pick = torch.as_tensor([row[int(i)] for i in top.flatten().tolist()], dtype=torch.long)
        images = torch.stack([self.images[i] for i in order])
        thumbs = (images if self._shrink() else _thumbnails(images, self.size)).cpu()
        features = torch.stack([self.features[i] for i in order])
        pick = pick.to(features.device)
        unit = torch.arange(units, device=features.device).repeat_interleave(ranks)
        channels, h, w = features.shape[1:]
        flat = features.reshape(-1, h, w)
        maps = flat.index_select(0, pick * channels + unit)[
            :, None
        ].float()  # [units * ranks, 1, h, w]
        up = upsample(maps, (self.size, self.size), self.image_size)
        thr = torch.as_tensor(ds["threshold"].values, device=up.device)
        masks = up.view(units, ranks, self.size, self.size) > thr.view(-1, 1, 1, 1)
        images = thumbs.index_select(0, pick.cpu()).view(units, ranks, self.size, self.size, 3)
        ds["top_image"] = (("unit", "rank", "y", "x", "rgb"), images.numpy())
        ds["top_mask"] = (("unit", "rank", "y", "x"), masks.cpu().numpy())


def _thumbnails(images: torch.Tensor, size: int) -> torch.Tensor:
    """Uint8 ``[B, size, size, 3]`` thumbnails of images ``[B, 3, H, W]`` in [0, 1]."""
    return image_bytes(_nearest(images, size))


def _nearest(images: torch.Tensor, size: int) -> torch.Tensor:
    """``images [B, C, H, W]`` resized to ``size x size`` by picking the nearest pixel
    (the pixels ``F.interpolate(mode="nearest")`` picks; two index selects)."""
    picks = []
    for n in images.shape[-2:]:
        scale = torch.tensor(n / size, dtype=torch.float32)
        index = (torch.arange(size, dtype=torch.float32) * scale).floor().long().clamp(max=n - 1)
        picks.append(index.to(images.device))
    return images.index_select(2, picks[0]).index_select(3, picks[1])
