"""Rendered ``scenes`` images and their object/part/material labels as compact tensors.

Training the demo models reads the same images many times, so they are rendered
once and cached (uint8, atomically written) under ``$NETHOOK_CACHE`` (default
``~/.cache/nethook``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nethook.atomic import atomic_path

#: Dense categories the segmentation net predicts, in head order.
CATEGORIES = ("object", "part", "material")


def cache_dir() -> Path:
    """Folder for cached renders (``$NETHOOK_CACHE`` or ``~/.cache/nethook``)."""
    root = os.environ.get("NETHOOK_CACHE") or Path.home() / ".cache" / "nethook"
    path = Path(root) / "gan"
    path.mkdir(parents=True, exist_ok=True)
    return path


def vocabulary() -> dict[str, tuple[str, ...]]:
    """Class names per category; index 0 of each is "none" (objects cover every pixel)."""
    from nethook_plugins.scenes.concepts import MATERIALS, OBJECTS, PARTS

    return {
        "object": ("none", *OBJECTS),
        "part": ("none", *PARTS),
        "material": ("none", *MATERIALS),
    }


def first_ids() -> dict[str, int]:
    """Global scenes concept id of class index 1 of each category."""
    from nethook_plugins.scenes.concepts import FIRST_MATERIAL, FIRST_PART

    return {"object": 1, "part": FIRST_PART, "material": FIRST_MATERIAL}


def render(n: int, size: int, seed: int, progress: bool = True) -> dict[str, torch.Tensor]:
    """``n`` scenes at ``size`` px: ``image`` uint8 ``[N, 3, S, S]`` and uint8 class maps
    ``object``/``part``/``material`` ``[N, S, S]`` (class indices of :func:`vocabulary`).
    Cached on disk by ``(n, size, seed)``."""
    path = cache_dir() / f"scenes_n{n}_s{size}_seed{seed}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    from nethook.plugins import get_source

    source = get_source(f"scenes:n={n},size={size},seed={seed},progress=0")
    first = first_ids()
    out = {
        "image": torch.empty((n, 3, size, size), dtype=torch.uint8),
        **{cat: torch.empty((n, size, size), dtype=torch.uint8) for cat in CATEGORIES},
    }
    for i in tqdm(range(n), desc=f"render scenes seed={seed}", disable=not progress):
        item = source[i]
        out["image"][i] = (item["image"] * 255).round().to(torch.uint8)
        for cat in CATEGORIES:
            ids = item["labels"][cat][0]
            out[cat][i] = torch.where(ids > 0, ids - first[cat] + 1, 0).to(torch.uint8)
    save_atomic(out, path)
    return out


def save_atomic(obj: object, path: Path) -> None:
    """``torch.save`` to a temporary name beside ``path``, then rename."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
