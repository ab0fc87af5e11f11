"""Concept sources and segmenters: the protocol every concept data set speaks.

A :class:`ConceptSource` is a ``torch.utils.data.Dataset`` whose items are dicts::

    {"image": float32 [3, H, W] in [0, 1],
     "labels": {category: int64 [L, h, w]},     # dense; global concept ids; 0 = none
     "image_labels": {category: int64 [K]},     # whole-image labels, 0-padded
     "index": int}

Dense categories may carry several label layers ``L`` (a pixel can be a "car" part
"wheel" and also in the part layer of another object), whole-image categories a
list of ``K`` labels. Concept ids are global across categories; id 0 means "none"
and is not listed in :meth:`ConceptSource.concepts`.

A :class:`Segmenter` labels arbitrary images with the same kind of dense labels;
:class:`SegmentedSource` wraps any image data set and a segmenter into a source.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

__all__ = [
    "CONCEPT_COLUMNS",
    "IMAGENET_NORMALIZATION",
    "ConceptSource",
    "Normalization",
    "Segmenter",
    "SegmentedSource",
    "collate",
    "concept_frame",
    "stable_hash",
    "tally_frequency",
]

CONCEPT_COLUMNS = ("id", "name", "category", "frequency")

Normalization = tuple[tuple[float, float, float], tuple[float, float, float]]

IMAGENET_NORMALIZATION: Normalization = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def stable_hash(parts: Any) -> str:
    """A short sha256 hex digest of a JSON-serializable description (sorted keys)."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def concept_frame(
    ids: Sequence[int],
    names: Sequence[str],
    categories: Sequence[str],
    frequency: Sequence[float] | None = None,
) -> pd.DataFrame:
    """Build a validated concept table (columns id, name, category, frequency).

    Ids must be unique positive integers (0 is reserved for "none"). ``frequency``
    is the number of images in which the concept appears; NaN where unknown.
    """
    n = len(ids)
    if len(names) != n or len(categories) != n:
        raise ValueError(
            f"concept table: ids ({n}), names ({len(names)}) and categories "
            f"({len(categories)}) must have the same length"
        )
    freq = np.full(n, np.nan) if frequency is None else np.asarray(frequency, dtype=float)
    if len(freq) != n:
        raise ValueError(f"concept table: frequency has {len(freq)} entries, expected {n}")
    frame = pd.DataFrame(
        {
            "id": np.asarray(ids, dtype=np.int64),
            "name": list(names),
            "category": list(categories),
            "frequency": freq,
        }
    )
    if (frame["id"] <= 0).any():
        raise ValueError("concept table: ids must be >= 1 (0 is reserved for 'none')")
    if frame["id"].duplicated().any():
        dup = frame.loc[frame["id"].duplicated(), "id"].tolist()
        raise ValueError(f"concept table: duplicate ids {dup}")
    return frame.sort_values("id").reset_index(drop=True)


def _pad_stack(tensors: list[torch.Tensor], what: str) -> torch.Tensor:
    """Stack tensors whose first dim varies, zero-padding it to the largest."""
    rest = {tuple(t.shape[1:]) for t in tensors}
    if len(rest) != 1:
        raise ValueError(f"collate: {what} have different trailing shapes {sorted(rest)}")
    if len({t.shape[0] for t in tensors}) == 1 and tensors[0].shape[0] > 0:
        return torch.stack(tensors)
    first = max(t.shape[0] for t in tensors)
    out = tensors[0].new_zeros((len(tensors), max(first, 1), *tensors[0].shape[1:]))
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t
    return out


def collate(items: list[dict]) -> dict:
    """Batch concept-source items (usable as a DataLoader ``collate_fn``).

    Images stack to ``[B, 3, H, W]``; each dense category to ``[B, Lmax, h, w]``
    and each image category to ``[B, Kmax]``, zero-padded (0 = no label); a
    category missing from some items is zero-filled there; ``index`` to ``[B]``.
    """
    if not items:
        raise ValueError("collate: empty batch")
    images = [torch.as_tensor(it["image"]) for it in items]
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1:
        raise ValueError(f"collate: images have different shapes {sorted(shapes)}")
    images = torch.stack(images)
    labels: dict[str, torch.Tensor] = {}
    for cat in dict.fromkeys(c for it in items for c in it.get("labels", {})):
        present = [it["labels"][cat] for it in items if cat in it.get("labels", {})]
        blank = present[0].new_zeros((0, *present[0].shape[1:]))
        labels[cat] = _pad_stack(
            [it.get("labels", {}).get(cat, blank) for it in items], f"labels[{cat!r}]"
        )
    image_labels: dict[str, torch.Tensor] = {}
    for cat in dict.fromkeys(c for it in items for c in it.get("image_labels", {})):
        blank = torch.zeros(0, dtype=torch.int64)
        image_labels[cat] = _pad_stack(
            [torch.as_tensor(it.get("image_labels", {}).get(cat, blank)) for it in items],
            f"image_labels[{cat!r}]",
        )
    index = torch.as_tensor([int(it["index"]) for it in items], dtype=torch.int64)
    return {"image": images, "labels": labels, "image_labels": image_labels, "index": index}


def tally_frequency(
    source: Dataset, num_concepts: int, limit: int | None = None, progress: bool = True
) -> np.ndarray:
    """Count, for each concept id in ``[0, num_concepts)``, the items it appears in.

    Scans dense and whole-image labels of the first ``limit`` items (all by default).
    """
    counts = np.zeros(num_concepts, dtype=np.int64)
    n = len(source) if limit is None else min(limit, len(source))
    for i in tqdm(range(n), desc="concept frequency", disable=not progress, leave=False):
        item = source[i]
        ids = [t.reshape(-1) for t in item.get("labels", {}).values()]
        ids += [torch.as_tensor(t).reshape(-1) for t in item.get("image_labels", {}).values()]
        if ids:
            present = torch.unique(torch.cat(ids)).cpu().numpy()
            present = present[(present > 0) & (present < num_concepts)]
            counts[present] += 1
    return counts


class ConceptSource(Dataset):
    """A data set of images with concept labels (see the module docstring).

    Subclasses set ``categories`` (dense category names) and ``image_categories``
    (whole-image category names), and implement ``__len__``, ``__getitem__``,
    :meth:`concepts` and :meth:`fingerprint_parts`.
    """

    categories: tuple[str, ...] = ()
    image_categories: tuple[str, ...] = ()
    collate = staticmethod(collate)

    @property
    def normalization(self) -> Normalization:
        """(mean, std) per RGB channel that models trained on this source expect."""
        return IMAGENET_NORMALIZATION

    def concepts(self) -> pd.DataFrame:
        """Concept table: columns id, name, category, frequency (see :func:`concept_frame`)."""
        raise NotImplementedError

    def fingerprint_parts(self) -> dict:
        """JSON-serializable description of everything that decides the content."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Stable hash of the source's content and parameters, for cache keys."""
        return stable_hash({"class": type(self).__qualname__, **self.fingerprint_parts()})

    def concept_names(self) -> dict[int, str]:
        """Map concept id -> name (convenience over :meth:`concepts`)."""
        table = self.concepts()
        return dict(zip(table["id"].tolist(), table["name"].tolist(), strict=True))

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        raise NotImplementedError


class Segmenter:
    """Labels images pixel by pixel with concepts.

    Subclasses set ``categories`` and implement :meth:`concepts` (frequency may be
    NaN) and :meth:`segment`; :meth:`fingerprint_parts` feeds cache keys.
    """

    categories: tuple[str, ...] = ()

    def concepts(self) -> pd.DataFrame:
        """Concept table of everything this segmenter can output (ids are global)."""
        raise NotImplementedError

    def segment(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Label ``images`` ``[B, 3, H, W]`` in [0, 1] -> ``{category: int64 [B, L, H, W]}``."""
        raise NotImplementedError

    def fingerprint_parts(self) -> dict:
        """JSON-serializable description of what decides the output."""
        return {}

    def fingerprint(self) -> str:
        """Stable hash of the segmenter's kind and parameters, for cache keys."""
        return stable_hash({"class": type(self).__qualname__, **self.fingerprint_parts()})

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.segment(images)


def _extract_image(item: Any, index: int) -> torch.Tensor:
    """The image of a data set item: a tensor, a (image, ...) tuple or a dict with "image"."""
    if isinstance(item, dict):
        if "image" not in item:
            raise ValueError(f"image data set item {index}: dict without an 'image' key")
        item = item["image"]
    elif isinstance(item, (tuple, list)):
        item = item[0]
    image = torch.as_tensor(item)
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(
            f"image data set item {index}: expected a [3, H, W] image, got shape {tuple(image.shape)}"
        )
    return image.float()


class SegmentedSource(ConceptSource):
    """Turns any image data set into a concept source by segmenting each image.

    ``images`` is a Dataset (or a ``[N, 3, H, W]`` tensor) whose items are images in
    [0, 1] (a tensor, a tuple whose first element is the image, or a dict with
    "image"). Labels come from ``segmenter.segment`` one image at a time; for
    throughput with a heavy segmenter, segment batches with the segmenter directly.
    ``frequency`` in :meth:`concepts` is tallied over the first ``frequency_limit``
    images on first use (None: all).
    """

    image_categories = ()

    def __init__(
        self,
        images: Dataset | torch.Tensor,
        segmenter: Segmenter,
        normalization: Normalization = IMAGENET_NORMALIZATION,
        name: str | None = None,
        frequency_limit: int | None = 200,
        progress: bool = True,
    ) -> None:
        self.images = images
        self.segmenter = segmenter
        self.categories = tuple(segmenter.categories)
        self._normalization = normalization
        self.name = name or type(images).__qualname__
        self.frequency_limit = frequency_limit
        self.progress = progress
        self._concepts: pd.DataFrame | None = None

    @property
    def normalization(self) -> Normalization:
        """(mean, std) given at construction (ImageNet's by default)."""
        return self._normalization

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range [0, {len(self)})")
        image = _extract_image(self.images[index], index)
        with torch.no_grad():
            seg = self.segmenter.segment(image[None])
        labels = {cat: seg[cat][0].to(torch.int64) for cat in self.categories}
        return {"image": image, "labels": labels, "image_labels": {}, "index": index}

    def concepts(self) -> pd.DataFrame:
        """The segmenter's concept table, with frequency tallied on the images."""
        if self._concepts is None:
            table = self.segmenter.concepts().copy()
            size = int(table["id"].max()) + 1 if len(table) else 1
            counts = tally_frequency(self, size, self.frequency_limit, self.progress)
            table["frequency"] = counts[table["id"].to_numpy()].astype(float)
            self._concepts = table
        return self._concepts.copy()

    def fingerprint_parts(self) -> dict:
        """Segmenter fingerprint plus the image set's own fingerprint (or name and length)."""
        images = self.images
        if hasattr(images, "fingerprint"):
            image_key: Any = images.fingerprint()
        elif isinstance(images, torch.Tensor):
            data = images.detach().cpu().contiguous().numpy().tobytes()
            image_key = hashlib.sha256(data).hexdigest()[:16]
        else:
            image_key = [self.name, len(images)]
        return {"images": image_key, "segmenter": self.segmenter.fingerprint()}
