"""PNG figures of a dissection: unique detectors by category, by layer, against rotation.

Matplotlib with the non-interactive Agg backend; every function writes one PNG
atomically and returns its path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from nethook.atomic import atomic_path

PALETTE = ["#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]
MASK_EDGE = np.array([255, 214, 0], dtype=np.uint8)


def category_colors(categories: Sequence[str]) -> dict[str, str]:
    """A stable colour per category (same order, same colour in every figure)."""
    return {cat: PALETTE[i % len(PALETTE)] for i, cat in enumerate(categories)}


def _save(fig, path: Path) -> Path:
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=96, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def unique_by_category(
    counts: Mapping[str, int], colors: Mapping[str, str], title: str, path: Path
) -> Path:
    """Bar chart of unique detectors per category for one layer (like thesis fig. 1-3)."""
    cats = list(colors)
    values = [counts.get(c, 0) for c in cats]
    fig, ax = plt.subplots(figsize=(4.2, 2.6))
    ax.bar(cats, values, color=[colors[c] for c in cats])
    for x, v in enumerate(values):
        ax.text(x, v, str(v), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("unique detectors")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, max(values + [1]) * 1.2)
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, path)


def detectors_by_layer(summary: pd.DataFrame, colors: Mapping[str, str], path: Path) -> Path:
    """Stacked bars: unique detectors by category for every layer, in network order."""
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(summary) + 2), 3.0))
    bottom = np.zeros(len(summary))
    x = np.arange(len(summary))
    for cat, color in colors.items():
        vals = summary[cat].to_numpy(dtype=float) if cat in summary else np.zeros(len(summary))
        ax.bar(x, vals, bottom=bottom, color=color, label=cat)
        bottom += vals
    ax.set_xticks(x, [str(s) for s in summary["layer"]], rotation=20)
    ax.set_ylabel("unique detectors")
    ax.set_title("Unique detectors by layer", fontsize=10)
    ax.legend(fontsize=7, frameon=False, bbox_to_anchor=(1.0, 1.0), loc="upper left")
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, path)


def rotation_curve(sweep: pd.DataFrame, path: Path) -> Path:
    """Unique detectors against rotation alpha, one line per layer (thesis §3.3.2).

    ``sweep`` has columns ``layer``, ``alpha`` and ``unique``.
    """
    fig, ax = plt.subplots(figsize=(4.2, 2.8))
    for i, (layer, part) in enumerate(sweep.groupby("layer", sort=False)):
        part = part.sort_values("alpha")
        ax.plot(
            part["alpha"], part["unique"], "o-", color=PALETTE[i % len(PALETTE)], label=str(layer)
        )
    ax.set_xlabel("rotation alpha")
    ax.set_ylabel("unique detectors")
    ax.set_title("Axis alignment: rotating the basis", fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, path)


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Draw a unit's mask over an image: outside dimmed, the boundary outlined.

    ``image`` is uint8 ``[H, W, 3]``, ``mask`` bool ``[H, W]``; returns uint8 ``[H, W, 3]``.
    """
    img = image.astype(np.float32)
    mask = mask.astype(bool)
    out = np.where(mask[..., None], img, img * 0.35)
    pad = np.pad(mask, 1, mode="edge")
    inner = pad[1:-1, 1:-1] & pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    edge = mask & ~inner
    out[edge] = MASK_EDGE
    return out.clip(0, 255).astype(np.uint8)


def unit_strip(images: np.ndarray, masks: np.ndarray, path: Path, gap: int = 2) -> Path:
    """One PNG with a unit's top images side by side, each with its mask drawn over it.

    ``images`` uint8 ``[K, H, W, 3]``, ``masks`` bool ``[K, H, W]``.
    """
    k, h, w, _ = images.shape
    strip = np.full((h, k * w + (k - 1) * gap, 3), 255, dtype=np.uint8)
    for i in range(k):
        strip[:, i * (w + gap) : i * (w + gap) + w] = overlay(images[i], masks[i])
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(strip).save(tmp, format="PNG")
    return path
