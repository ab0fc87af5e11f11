"""scenes-seg: the demo segmentation net (:mod:`nethook.gan.segnet`) as a segmenter.

Labels any ``[B, 3, H, W]`` image in [0, 1] with the ``scenes`` vocabulary: dense
categories ``object``, ``part`` and ``material`` with the same global concept ids
as the ``scenes`` source, so its labels of real scenes and of generated ones are
directly comparable. With ``parts=1`` (the default) every object class ``c`` also
yields GAN-dissection part classes ``c-t``, ``c-b``, ``c-l``, ``c-r`` (halves of
each connected component's bounding box, from the ``segmenter`` plugin's
:func:`expand_parts`), as two extra layers of the ``part`` category.

The net was trained on 32 x 32 scenes; other sizes are resized to 32 x 32 and the
labels resized back (nearest).

Spec: ``scenes-seg`` or ``scenes-seg:parts=0,weights=FILE``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pluggy
import torch
import torch.nn.functional as F

from nethook.sources import Segmenter, concept_frame

from .segmenter import PART_SUFFIXES, _hash_state, expand_parts

__all__ = ["ScenesSegmenter", "nethook_segmenters"]

hookimpl = pluggy.HookimplMarker("nethook")

INPUT_SIZE = 32


class ScenesSegmenter(Segmenter):
    """The demo segmentation net with the scenes concept ids (see the module docstring)."""

    categories = ("object", "part", "material")

    def __init__(self, parts: bool = True, weights: str | Path | None = None) -> None:
        from nethook.gan.data import first_ids, vocabulary
        from nethook.gan.segnet import scenes_segnet

        from .scenes.concepts import concept_rows

        self.model = scenes_segnet(weights)
        self.parts = bool(parts)
        self.weights = str(weights) if weights else "shipped"
        self._vocab = vocabulary()
        self._first = first_ids()
        self._rows = [row for row in concept_rows() if row[2] in self.categories]
        self._objects = len(self._vocab["object"])
        self._part_base = max(row[0] for row in concept_rows()) + 1
        if self.parts:
            self._rows += [
                (self._part_base + 4 * i + k, f"{name}-{s}", "part")
                for i, name in enumerate(self._vocab["object"][1:])
                for k, s in enumerate(PART_SUFFIXES)
            ]
        self._hash: str | None = None

    def concepts(self) -> pd.DataFrame:
        """Objects, parts and materials (scenes ids), then the c-t/c-b/c-l/c-r parts."""
        ids, names, cats = zip(*self._rows, strict=True)
        return concept_frame(ids, names, cats)

    def fingerprint_parts(self) -> dict:
        """Weights hash and the parts option."""
        if self._hash is None:
            self._hash = _hash_state(self.model)
        return {"weights": self._hash, "parts": self.parts}

    def class_maps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Class indices per category ``{cat: int64 [B, H, W]}`` (0 = none), at the images' size."""
        from nethook.gan.train_segnet import prepare

        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"scenes-seg: expected images [B, 3, H, W] in [0, 1], got {tuple(images.shape)}"
            )
        size = images.shape[-2:]
        x = images
        if tuple(size) != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True)
        self.model.to(images.device)
        with torch.no_grad():
            out = self.model(prepare(x))
        maps = {cat: logits.argmax(1) for cat, logits in out.items()}
        if tuple(size) != (INPUT_SIZE, INPUT_SIZE):
            maps = {
                c: F.interpolate(m[:, None].float(), size=size, mode="nearest")[:, 0].long()
                for c, m in maps.items()
            }
        return maps

    def probability(self, images: torch.Tensor, concept: int) -> torch.Tensor:
        """Differentiable ``[B, H, W]`` probability of concept id ``concept`` at each pixel.

        The softmax of the concept's head; for a part half ``c-t`` etc. the object's
        probability inside that half of the (hard) segmentation's components.
        """
        from nethook.gan.train_segnet import prepare

        half = None
        if self.parts and concept >= self._part_base:
            code = concept - self._part_base
            obj, half = code // 4 + 1, code % 4
            cat, index = "object", obj
        else:
            cat, index = next(
                (c, concept - self._first[c] + 1)
                for c in reversed(self.categories)
                if concept >= self._first[c]
            )
        size = images.shape[-2:]
        x = images
        if tuple(size) != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True)
        self.model.to(images.device)
        prob = self.model(prepare(x))[cat].softmax(1)[:, index]
        if tuple(size) != (INPUT_SIZE, INPUT_SIZE):
            prob = F.interpolate(prob[:, None], size=size, mode="bilinear")[:, 0]
        if half is not None:
            with torch.no_grad():
                codes = self.segment(images)["part"][:, 1 + half // 2]
            prob = prob * (codes == concept).to(prob.dtype)
        return prob

    def segment(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{object: [B, 1, H, W], part: [B, 1 or 3, H, W], material: [B, 1, H, W]}``."""
        maps = self.class_maps(images)
        result = {
            c: torch.where(m > 0, m + self._first[c] - 1, 0)[:, None] for c, m in maps.items()
        }
        if self.parts:
            codes = expand_parts(maps["object"], self._objects)
            codes = torch.where(codes > 0, codes + self._part_base - 1, 0)
            result["part"] = torch.cat([result["part"], codes], dim=1)
        return result


def _factory(arg: str) -> ScenesSegmenter:
    from nethook.plugins import parse_kwargs

    kwargs = parse_kwargs(arg)
    unknown = sorted(set(kwargs) - {"parts", "weights"})
    if unknown:
        raise ValueError(f"scenes-seg:{arg}: unknown option(s) {unknown}; expected parts, weights")
    return ScenesSegmenter(parts=bool(kwargs.get("parts", True)), weights=kwargs.get("weights"))


@hookimpl
def nethook_segmenters():
    """Register the ``scenes-seg`` segmenter."""
    return {"scenes-seg": _factory}
