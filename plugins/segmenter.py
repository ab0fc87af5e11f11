"""segmenter: any torch segmentation model as a nethook segmenter, with optional parts.

Wraps a model (an ``nn.Module`` or any callable) that maps images to class scores
``[B, K, H', W']`` — or a dict with an ``"out"`` entry, as torchvision's
DeepLabV3/FCN/LRASPP return — plus its K label names. Each pixel gets the class
of highest score (scores are resized bilinearly to the image size first). Names
such as ``background`` or ``__background__`` mean "no label".

With ``parts=True`` every object class ``c`` also yields part classes ``c-t``,
``c-b``, ``c-l`` and ``c-r``: the top/bottom/left/right half of the bounding box
of each connected component (4-connected) of ``c``, as in GAN dissection. A
pixel row (column) is in the top (left) half when its centre lies strictly
above (left of) the middle of the box, so each part pixel carries two part
labels, one vertical and one horizontal (two label layers).

Spec: ``segmenter:model=SPEC,weights=FILE,labels=FILE,parts=1,normalize=imagenet``
where SPEC is a :func:`nethook.load_model` spec without keyword arguments (commas
separate this spec's own options), ``labels`` a JSON list or a text file with one
name per line, ``normalize`` ``imagenet`` (default) or ``none``, and ``category``
(default ``object``) names the dense category of the classes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pluggy
import torch
import torch.nn.functional as F
from scipy import ndimage

from nethook.sources import IMAGENET_NORMALIZATION, Normalization, Segmenter, concept_frame

__all__ = ["ModelSegmenter", "expand_parts", "nethook_segmenters", "read_labels"]

hookimpl = pluggy.HookimplMarker("nethook")

NO_LABEL_NAMES = frozenset({"", "-", "none", "background", "__background__", "unlabeled"})
PART_SUFFIXES = ("t", "b", "l", "r")


def read_labels(path: str | Path) -> list[str]:
    """Class names from a JSON list (or {index: name} dict) or a text file, one per line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ValueError(f"segmenter labels file {str(path)!r}: cannot read ({err})") from err
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"segmenter labels file {str(path)!r}: invalid JSON ({err})") from err
        if isinstance(data, dict):
            data = [data[k] for k in sorted(data, key=int)]
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise ValueError(
                f"segmenter labels file {str(path)!r}: expected a JSON list of names "
                "or an {index: name} object"
            )
        return data
    return [line.strip() for line in text.splitlines() if line.strip()]


def expand_parts(classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Split each connected component of each class into halves of its bounding box.

    ``classes``: int ``[B, H, W]`` class indices in ``[0, num_classes)`` (0 = none).
    Returns int64 ``[B, 2, H, W]``: layer 0 is ``4 * (c - 1) + 1`` (top) or ``+ 2``
    (bottom), layer 1 ``4 * (c - 1) + 3`` (left) or ``+ 4`` (right), 0 where c = 0.
    So part codes run from 1 to ``4 * (num_classes - 1)``, in the order t, b, l, r.
    """
    if classes.dim() != 3:
        raise ValueError(f"expand_parts: expected classes [B, H, W], got {tuple(classes.shape)}")
    cls = classes.detach().cpu().numpy().astype(np.int64)
    out = np.zeros((cls.shape[0], 2, *cls.shape[1:]), dtype=np.int64)
    rows = np.arange(cls.shape[1])[:, None] + 0.5
    cols = np.arange(cls.shape[2])[None, :] + 0.5
    for b, image in enumerate(cls):
        for c in np.unique(image):
            if c <= 0 or c >= num_classes:
                continue
            comp, n = ndimage.label(image == c)
            boxes = ndimage.find_objects(comp)
            mid_y = np.zeros(n + 1)
            mid_x = np.zeros(n + 1)
            for k, (ys, xs) in enumerate(boxes, start=1):
                mid_y[k] = (ys.start + ys.stop) / 2
                mid_x[k] = (xs.start + xs.stop) / 2
            inside = comp > 0
            base = 4 * (c - 1)
            top = rows < mid_y[comp]
            left = cols < mid_x[comp]
            out[b, 0][inside] = np.where(top, base + 1, base + 2)[inside]
            out[b, 1][inside] = np.where(left, base + 3, base + 4)[inside]
    return torch.from_numpy(out).to(classes.device)


def _hash_state(model: Any) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes, values); '' for other callables."""
    if not isinstance(model, torch.nn.Module):
        return ""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class ModelSegmenter(Segmenter):
    """A segmentation model and its label names as a :class:`~nethook.sources.Segmenter`.

    ``model(images_normalized) -> scores [B, K, H', W']`` (or ``{"out": scores}``);
    ``labels`` has K names. Concept ids: the non-background classes 1..N in label
    order (category ``category``), then, with ``parts``, 4 part concepts per class.
    ``normalization`` (mean, std) is applied to the [0, 1] images first (None: none).
    """

    def __init__(
        self,
        model: Callable[[torch.Tensor], Any],
        labels: Sequence[str],
        parts: bool = False,
        category: str = "object",
        normalization: Normalization | None = IMAGENET_NORMALIZATION,
        name: str = "model",
    ) -> None:
        if not callable(model):
            raise TypeError(f"segmenter: model must be callable, got {type(model).__qualname__}")
        self.model = model
        self.labels = [str(x) for x in labels]
        if not self.labels:
            raise ValueError("segmenter: labels is empty; expected one name per model class")
        self.parts = bool(parts)
        self.category = category
        self.categories = (category, "part") if self.parts else (category,)
        self.normalization = normalization
        self.name = name
        # class index -> concept id (0 for background-like names)
        ids, n = [], 0
        for label in self.labels:
            if label.strip().lower() in NO_LABEL_NAMES:
                ids.append(0)
            else:
                n += 1
                ids.append(n)
        self._class_to_id = torch.tensor(ids, dtype=torch.int64)
        self._num_objects = n
        self._weights_hash: str | None = None

    def concepts(self) -> pd.DataFrame:
        """Object classes (ids 1..N), then their parts c-t, c-b, c-l, c-r (ids N+1..5N)."""
        names = [x for x, i in zip(self.labels, self._class_to_id.tolist(), strict=True) if i]
        rows = [(i + 1, name, self.category) for i, name in enumerate(names)]
        if self.parts:
            n = len(names)
            rows += [
                (n + 4 * i + k + 1, f"{name}-{s}", "part")
                for i, name in enumerate(names)
                for k, s in enumerate(PART_SUFFIXES)
            ]
        ids, concept_names, cats = zip(*rows, strict=True) if rows else ((), (), ())
        return concept_frame(ids, concept_names, cats)

    def fingerprint_parts(self) -> dict:
        """Model name and weights hash, labels, parts, category and normalization."""
        if self._weights_hash is None:
            self._weights_hash = _hash_state(self.model)
        return {
            "model": self.name,
            "weights": self._weights_hash,
            "labels": self.labels,
            "parts": self.parts,
            "category": self.category,
            "normalization": self.normalization,
        }

    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """Class scores ``[B, K, H, W]`` at the images' resolution."""
        x = images
        if self.normalization is not None:
            mean = torch.tensor(self.normalization[0], dtype=x.dtype, device=x.device)
            std = torch.tensor(self.normalization[1], dtype=x.dtype, device=x.device)
            x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
        if isinstance(self.model, torch.nn.Module):
            self.model.to(images.device)
        out = self.model(x)
        if isinstance(out, dict):
            out = out["out"]
        elif isinstance(out, (tuple, list)):
            out = out[0]
        if out.dim() != 4 or out.shape[1] != len(self.labels):
            raise ValueError(
                f"segmenter {self.name!r}: model returned shape {tuple(out.shape)}; expected "
                f"[B, {len(self.labels)}, H, W] scores for its {len(self.labels)} labels"
            )
        if out.shape[-2:] != images.shape[-2:]:
            out = F.interpolate(out, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return out

    def segment(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Label ``[B, 3, H, W]`` images -> ``{category: [B, 1, H, W]}`` (+ ``part: [B, 2, H, W]``)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"segmenter {self.name!r}: expected images [B, 3, H, W], got {tuple(images.shape)}"
            )
        with torch.no_grad():
            classes = self.scores(images).argmax(dim=1)
        ids = self._class_to_id.to(classes.device)[classes]
        result = {self.category: ids[:, None]}
        if self.parts:
            codes = expand_parts(ids, self._num_objects + 1)
            result["part"] = torch.where(codes > 0, codes + self._num_objects, codes)
        return result


def _factory(arg: str) -> ModelSegmenter:
    from nethook import load_model
    from nethook.plugins import parse_kwargs

    kwargs = parse_kwargs(arg)
    known = {"model", "weights", "labels", "parts", "category", "normalize"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"segmenter:{arg}: unknown option(s) {unknown}; expected {sorted(known)}")
    for key in ("model", "labels"):
        if key not in kwargs:
            raise ValueError(f"segmenter:{arg}: missing {key}=...; e.g. {_EXAMPLE}")
    normalize = str(kwargs.get("normalize", "imagenet")).lower()
    if normalize not in ("imagenet", "none"):
        raise ValueError(f"segmenter:{arg}: normalize={normalize!r}; expected imagenet or none")
    spec = str(kwargs["model"])
    return ModelSegmenter(
        load_model(spec, weights=kwargs.get("weights")),
        read_labels(kwargs["labels"]),
        parts=bool(kwargs.get("parts", False)),
        category=str(kwargs.get("category", "object")),
        normalization=IMAGENET_NORMALIZATION if normalize == "imagenet" else None,
        name=spec,
    )


_EXAMPLE = "segmenter:model=mypkg.seg:build,weights=seg.pt,labels=labels.txt,parts=1"


@hookimpl
def nethook_segmenters():
    """Register the ``segmenter`` adapter."""
    return {"segmenter": _factory}
