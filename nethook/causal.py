"""Interventions on generator units and their average causal effect (GAN Dissection).

(thesis 4.3.2 and A.4; ``shared/METHODS.md`` section 2.) With ``r = h(z)`` the
output of ``layer`` and ``x = f(r)``:

- *ablation* of units ``U`` at locations ``P``: ``r[U, P] = 0``
  (:class:`~nethook.interventions.Ablate` with a spatial mask);
- *insertion*: ``r[U, P] = k``, ``k`` the mean feature vector where concept ``c``
  is present, each feature cell weighted by the share of its area that ``c``
  covers (:func:`insertion_constant`, a :class:`~nethook.stats.compose.Conditional`
  of :class:`~nethook.stats.moments.Mean`; :class:`~nethook.interventions.Replace`);
- *average causal effect* ``ACE(U -> c) = E[s_c(x_ins)] - E[s_c(x_abl)]``, with the
  concept's pixel share ``s_c`` normalized by ``E[s_c(x)]`` (:func:`average_causal_effect`);
- *causal unit search* (:func:`search_causal_units`): a continuous ``alpha`` in
  ``[0, 1]^d`` applied as partial ablation ``(1 - alpha) r`` and partial insertion
  ``alpha k + (1 - alpha) r`` at sampled locations, trained with Adam on
  ``-delta_alpha + lambda ||alpha||^2`` and clamped each step, initialized from
  IoU; units ranked by ``alpha``;
- the ablation curve comparing rankings (thesis figure 4-4, :func:`ablation_curve`)
  and the context test (figure 4-11, :func:`context_test`).

The search needs gradients through the intervention, per-image locations and a
differentiable segmentation: it uses :class:`~nethook.interventions.PartialAblate`
and :class:`~nethook.interventions.PartialInsert` with a tensor ``alpha`` and a
``[B, h, w]`` mask, and the segmenter's ``probability(images, concept_id) -> [B, H, W]``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import xarray as xr
from torch import nn
from tqdm.auto import tqdm

from nethook.atomic import atomic_path
from nethook.dissect import image_bytes
from nethook.gandissect import generate, resolve_concepts, sample_z
from nethook.interventions import Ablate, PartialAblate, PartialInsert, Replace
from nethook.models import model_device
from nethook.sources import Segmenter
from nethook.stats.compose import Conditional
from nethook.stats.moments import Mean
from nethook.trace import Trace

__all__ = [
    "CausalSearch",
    "ablation_curve",
    "average_causal_effect",
    "concept_coverage",
    "concept_id",
    "context_test",
    "insertion_constant",
    "search_causal_units",
]


def concept_id(segmenter: Segmenter, concept: str | int) -> int:
    """The id of ``concept`` (a name or id) in the segmenter's table, or an error listing
    close names."""
    return resolve_concepts(segmenter.concepts(), [concept])[0]


def concept_mask(labels: dict[str, torch.Tensor], cid: int) -> torch.Tensor:
    """Bool ``[B, H, W]``: pixels labelled ``cid`` in any category and label layer."""
    masks = [(t == cid).any(dim=1) for t in labels.values()]
    out = masks[0]
    for m in masks[1:]:
        out = out | m
    return out


def concept_coverage(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Share ``[B, h, w]`` of each feature cell's area covered by a ``[B, H, W]`` mask."""
    return F.adaptive_avg_pool2d(mask.float()[:, None], size)[:, 0]


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield start, min(n, start + batch_size)


def insertion_constant(
    generator: nn.Module,
    layer: str,
    segmenter: Segmenter,
    concept: str | int,
    *,
    n: int = 200,
    seed: int = 0,
    batch_size: int = 50,
    progress: bool = False,
) -> torch.Tensor:
    """``k [C]``: the mean feature where ``concept`` is present, weighted by coverage.

    ``k = sum_cells w r / sum_cells w`` over ``n`` generated images, ``w`` the share
    of a feature cell covered by the concept in the segmented output.
    """
    cid = concept_id(segmenter, concept)
    stat = Conditional(Mean)
    z_all = sample_z(generator, n, seed)
    device = model_device(generator)
    for a, b in tqdm(
        list(_batches(n, batch_size)), desc="insertion constant", disable=not progress
    ):
        batch = generate(generator, layer, z_all[a:b].to(device), segmenter)
        r = batch.features
        w = concept_coverage(concept_mask(batch.labels, cid), r.shape[-2:])
        rows = torch.cat([r * w[:, None], w[:, None]], dim=1)
        rows = rows.permute(0, 2, 3, 1).reshape(-1, r.shape[1] + 1).double()
        stat.update(rows, cid)
    if cid not in stat or float(stat[cid].mean()[-1]) <= 0:
        raise ValueError(
            f"concept {concept!r} never appears in {n} generated images; "
            "cannot compute its insertion constant"
        )
    m = stat[cid].mean()
    return (m[:-1] / m[-1]).float()


def concept_share(segmenter: Segmenter, images: torch.Tensor, cid: int) -> torch.Tensor:
    """``[B]`` share of each image's pixels labelled ``cid``."""
    return concept_mask(segmenter.segment(images), cid).float().mean(dim=(1, 2))


@dataclass
class Effect:
    """Mean concept share of the original, ablated and inserted images, and the ACE."""

    base: float
    ablated: float
    inserted: float

    @property
    def ace(self) -> float:
        """``(E[s(x_ins)] - E[s(x_abl)]) / E[s(x)]`` (NaN when the concept never appears)."""
        return (self.inserted - self.ablated) / self.base if self.base > 0 else float("nan")

    @property
    def removed(self) -> float:
        """Share of the concept's pixels that ablation removes: ``1 - E[s(x_abl)] / E[s(x)]``."""
        return 1 - self.ablated / self.base if self.base > 0 else float("nan")

    def to_json(self) -> dict[str, float]:
        """Plain numbers."""
        return {
            "base": self.base,
            "ablated": self.ablated,
            "inserted": self.inserted,
            "ace": self.ace,
            "removed": self.removed,
        }


def average_causal_effect(
    generator: nn.Module,
    layer: str,
    segmenter: Segmenter,
    concept: str | int,
    units: Sequence[int],
    k: torch.Tensor,
    *,
    mask: Any = None,
    n: int = 200,
    seed: int = 1,
    batch_size: int = 50,
    progress: bool = False,
) -> Effect:
    """ACE of ``units`` on ``concept`` over ``n`` samples of z (``seed``).

    Ablation sets the units to 0 and insertion to ``k[units]`` inside ``mask``
    (``[h, w]`` over the feature map; None: everywhere). Shares are of whole images.
    """
    cid = concept_id(segmenter, concept)
    units = [int(u) for u in units]
    ablate = Ablate(units=units, mask=mask)
    insert = Replace(units=units, values=k[units].tolist(), mask=mask)
    z_all = sample_z(generator, n, seed)
    device = model_device(generator)
    sums = np.zeros(3)
    for a, b in tqdm(list(_batches(n, batch_size)), desc="ACE", disable=not progress):
        z = z_all[a:b].to(device)
        for i, edit in enumerate((None, ablate, insert)):
            images = generate(generator, layer, z, edit=edit).images
            sums[i] += float(concept_share(segmenter, images, cid).sum())
    base, ablated, inserted = sums / n
    return Effect(base, ablated, inserted)


def _probability(segmenter: Segmenter, images: torch.Tensor, cid: int) -> torch.Tensor:
    prob = getattr(segmenter, "probability", None)
    if prob is None:
        raise ValueError(
            f"segmenter {type(segmenter).__name__} has no differentiable "
            "probability(images, concept_id) -> [B, H, W]; the causal search needs one"
        )
    return prob(images, cid)


def _region_pixels(region: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Feature-cell regions ``[B, h, w]`` -> image-pixel regions ``[B, H, W]`` (nearest)."""
    return F.interpolate(region[:, None].float(), size=size, mode="nearest")[:, 0]


@dataclass
class CausalSearch:
    """State and result of :func:`search_causal_units`."""

    concept: str
    alpha: np.ndarray
    epoch: int = 0
    history: list[dict] = field(default_factory=list)

    def ranking(self) -> np.ndarray:
        """Units by decreasing ``alpha`` (ties toward the smaller unit)."""
        return np.lexsort((np.arange(len(self.alpha)), -self.alpha))

    def top(self, n: int = 20) -> list[int]:
        """The ``n`` units with the largest ``alpha``."""
        return [int(u) for u in self.ranking()[:n]]

    def to_xarray(self) -> xr.Dataset:
        """``alpha`` along ``unit`` and the loss history along ``epoch``."""
        hist = pd.DataFrame(self.history)
        data = {"alpha": ("unit", self.alpha.astype(np.float32))}
        for col in ("loss", "delta"):
            if col in hist:
                data[col] = ("epoch", hist[col].to_numpy())
        return xr.Dataset(
            data,
            coords={"unit": np.arange(len(self.alpha)), "epoch": np.arange(len(hist))},
            attrs={"concept": self.concept},
        )


def _sample_locations(
    present: torch.Tensor, appear: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """One feature cell per image, one-hot ``[B, h, w]``: the first half of the batch
    where the concept is present, the second where it would appear under full
    insertion (falling back to any cell when an image has none)."""
    b, h, w = present.shape
    out = torch.zeros(b, h * w)
    for i in range(b):
        pool = (present[i] if i < (b + 1) // 2 else appear[i]).flatten().nonzero().flatten()
        if len(pool) == 0:
            pool = torch.arange(h * w)
        out[i, pool[torch.randint(len(pool), (1,), generator=gen)]] = 1
    return out.view(b, h, w)


def search_causal_units(
    generator: nn.Module,
    layer: str,
    segmenter: Segmenter,
    concept: str | int,
    k: torch.Tensor,
    iou: Sequence[float] | np.ndarray | None = None,
    *,
    epochs: int = 10,
    steps_per_epoch: int = 10,
    batch_size: int = 16,
    lr: float = 0.05,
    penalty: float = 0.01,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    progress: bool = True,
) -> CausalSearch:
    """Optimize ``alpha`` (see the module docstring) and return the search state.

    ``iou`` (one per unit) initializes ``alpha_u = IoU_u / max IoU`` (all ones if
    None). Every step draws a fresh batch of z (a function of ``seed`` and the step)
    and one feature cell per image, half where ``concept`` is present and half where
    it appears under full insertion of ``k`` (presence: probability > 0.5); ``s_c`` is the segmenter's
    differentiable probability averaged over that cell's pixels. ``checkpoint`` is
    a file written after each epoch; a run with the same settings resumes from it.
    """
    cid = concept_id(segmenter, concept)
    device = model_device(generator)
    k = torch.as_tensor(k, dtype=torch.float32, device=device)
    d = k.numel()
    if iou is None:
        init = np.ones(d)
    else:
        iou = np.nan_to_num(np.asarray(iou, dtype=np.float64), nan=0.0)
        if iou.shape != (d,):
            raise ValueError(f"iou has shape {iou.shape}; expected one value per unit ({d},)")
        init = iou / iou.max() if iou.max() > 0 else np.ones(d)
    settings = {
        "concept": cid,
        "layer": layer,
        "epochs_per": steps_per_epoch,
        "batch": batch_size,
        "lr": lr,
        "penalty": penalty,
        "seed": seed,
        "init": hashlib.sha256(np.asarray(init, dtype=np.float64).tobytes()).hexdigest()[:16],
    }
    alpha = torch.tensor(init, dtype=torch.float32, device=device, requires_grad=True)
    opt = torch.optim.Adam([alpha], lr=lr)
    state = CausalSearch(str(concept), init.copy())
    path = Path(checkpoint) if checkpoint else None
    if path is not None and path.is_file():
        saved = torch.load(path, weights_only=True)
        if json.loads(saved["settings"]) == settings:
            with torch.no_grad():
                alpha.copy_(saved["alpha"])
            opt.load_state_dict(saved["opt"])
            state.epoch = int(saved["epoch"])
            state.history = json.loads(saved["history"])
    for p in generator.parameters():
        p.requires_grad_(False)
    full_insert = PartialInsert(values=k, alpha=torch.ones(d, device=device))
    bar = tqdm(total=epochs, initial=state.epoch, desc="causal search", disable=not progress)
    while state.epoch < epochs:
        losses, deltas = [], []
        for step in range(steps_per_epoch):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + state.epoch * 10_007 + step)
            z = torch.randn(batch_size, generator.z_dim, generator=gen).to(device)
            with torch.no_grad():
                base = generate(generator, layer, z)
                hw = base.features.shape[-2:]
                seen = _probability(segmenter, base.images, cid) > 0.5
                present = concept_coverage(seen, hw) > 0
                inserted = generate(generator, layer, z, edit=full_insert)
                seen = _probability(segmenter, inserted.images, cid) > 0.5
                appear = (concept_coverage(seen, hw) > 0) & ~present
            region = _sample_locations(present.cpu(), appear.cpu(), gen).to(device)
            pix = _region_pixels(region, base.images.shape[-2:])
            area = pix.sum(dim=(1, 2)).clamp(min=1)
            shares = []
            edits = (
                PartialAblate(alpha=alpha, mask=region),
                PartialInsert(values=k, alpha=alpha, mask=region),
            )
            for edit in edits:
                with Trace(generator, layer, edit_output=edit):
                    images = generator(z)
                prob = _probability(segmenter, images, cid)
                shares.append(((prob * pix).sum(dim=(1, 2)) / area).mean())
            delta = shares[1] - shares[0]
            loss = -delta + penalty * alpha.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                alpha.clamp_(0, 1)
            losses.append(float(loss.detach()))
            deltas.append(float(delta.detach()))
        state.epoch += 1
        state.alpha = alpha.detach().cpu().numpy().copy()
        state.history.append({"loss": float(np.mean(losses)), "delta": float(np.mean(deltas))})
        if path is not None:
            from nethook.gan.data import save_atomic

            save_atomic(
                {
                    "settings": json.dumps(settings),
                    "alpha": alpha.detach().cpu(),
                    "opt": opt.state_dict(),
                    "epoch": state.epoch,
                    "history": json.dumps(state.history),
                },
                path,
            )
        bar.update(1)
    bar.close()
    state.alpha = alpha.detach().cpu().numpy().copy()
    return state


def ablation_curve(
    generator: nn.Module,
    layer: str,
    segmenter: Segmenter,
    concept: str | int,
    rankings: dict[str, Sequence[int]],
    counts: Sequence[int] = (1, 2, 4, 8, 12, 16, 20),
    *,
    n: int = 100,
    seed: int = 2,
    batch_size: int = 50,
    progress: bool = False,
) -> xr.DataArray:
    """Share of ``concept`` removed when ablating the first ``m`` units of each ranking.

    Returns ``removed[ranking, units]`` (thesis figure 4-4: 1 - E[s(x_abl)] / E[s(x)],
    ablation everywhere, over ``n`` samples of z).
    """
    cid = concept_id(segmenter, concept)
    z_all = sample_z(generator, n, seed)
    device = model_device(generator)
    base = 0.0
    for a, b in _batches(n, batch_size):
        images = generate(generator, layer, z_all[a:b].to(device)).images
        base += float(concept_share(segmenter, images, cid).sum())
    out = np.full((len(rankings), len(counts)), np.nan)
    for i, order in enumerate(tqdm(rankings.values(), desc="ablation curve", disable=not progress)):
        for j, m in enumerate(counts):
            left = 0.0
            edit = Ablate(units=[int(u) for u in list(order)[:m]])
            for a, b in _batches(n, batch_size):
                images = generate(generator, layer, z_all[a:b].to(device), edit=edit).images
                left += float(concept_share(segmenter, images, cid).sum())
            out[i, j] = 1 - left / base if base > 0 else np.nan
    return xr.DataArray(
        out,
        dims=("ranking", "units"),
        coords={"ranking": list(rankings), "units": list(counts)},
        name="removed",
        attrs={"concept": str(concept), "samples": n},
    )


def context_test(
    generator: nn.Module,
    layer: str,
    segmenter: Segmenter,
    concept: str | int,
    units: Sequence[int],
    k: torch.Tensor,
    *,
    n: int = 4,
    seed: int = 3,
    context_category: str = "object",
    progress: bool = False,
) -> tuple[xr.DataArray, pd.DataFrame, np.ndarray]:
    """Insert ``units`` (value ``k``) at each feature cell in turn (thesis figure 4-11).

    Returns ``effect[image, y, x]`` (the concept's share of the inserted cell's pixels
    after insertion minus before), a table of the mean effect by the context class
    (the ``context_category`` label under the cell in the original image, majority),
    and the original images ``uint8 [n, H, W, 3]``.
    """
    cid = concept_id(segmenter, concept)
    z = sample_z(generator, n, seed).to(model_device(generator))
    base = generate(generator, layer, z, segmenter)
    h, w = base.features.shape[-2:]
    size = base.images.shape[-2:]
    before = concept_mask(base.labels, cid).float()
    names = dict(zip(segmenter.concepts()["id"], segmenter.concepts()["name"], strict=True))
    ctx = base.labels.get(context_category)
    effect = np.zeros((n, h, w))
    rows = []
    units = [int(u) for u in units]
    for y in tqdm(range(h), desc="context test", disable=not progress):
        for x in range(w):
            cell = torch.zeros(h, w)
            cell[y, x] = 1
            edit = Replace(units=units, values=k[units].tolist(), mask=cell)
            images = generate(generator, layer, z, edit=edit).images
            after = concept_mask(segmenter.segment(images), cid).float()
            pix = _region_pixels(cell[None].expand(n, -1, -1), size).to(after.device)
            gain = ((after - before) * pix).sum(dim=(1, 2)) / pix.sum(dim=(1, 2))
            effect[:, y, x] = gain.cpu().numpy()
            for i in range(n):
                label = "none"
                if ctx is not None:
                    under = ctx[i, 0][pix[i] > 0]
                    if len(under):
                        label = names.get(int(torch.mode(under).values), "none")
                rows.append(
                    {"image": i, "y": y, "x": x, "context": label, "effect": effect[i, y, x]}
                )
    table = pd.DataFrame(rows).groupby("context")["effect"].agg(["mean", "count"]).reset_index()
    images = image_bytes(base.images)
    heat = xr.DataArray(
        effect, dims=("image", "y", "x"), name="effect", attrs={"concept": str(concept)}
    )
    return heat, table.sort_values("mean", ascending=False), images.cpu().numpy()


# ---- pictures -------------------------------------------------------------------------------


def _atomic_png(path: Path, write) -> Path:
    """Call ``write(tmp_path)`` then rename to ``path`` (complete or absent)."""
    with atomic_path(path, suffix=".png") as tmp:
        write(str(tmp))
    return Path(path)


def save_grid(before: torch.Tensor, after: torch.Tensor, path: str | Path, scale: int = 2) -> Path:
    """One PNG: images ``[B, 3, H, W]`` in [0, 1] in a row, their edited versions below."""
    from PIL import Image

    rows = torch.cat([before, after], dim=0).detach().float().clamp(0, 1).cpu()
    rows = F.interpolate(rows, scale_factor=scale, mode="nearest")
    b, _, h, w = before.shape[0], *rows.shape[1:]
    gap = 2
    canvas = np.full((2 * h + gap, b * (w + gap) - gap, 3), 255, dtype=np.uint8)
    pixels = image_bytes(rows).numpy()
    for i in range(2 * b):
        r, c = divmod(i, b)
        canvas[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = pixels[i]
    return _atomic_png(path, lambda tmp: Image.fromarray(canvas).save(tmp, format="PNG"))


def plot_ablation_curve(curve: xr.DataArray, path: str | Path) -> Path:
    """Line plot of ``removed[ranking, units]`` (thesis figure 4-4, right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for name in curve["ranking"].values:
        ax.plot(curve["units"].values, curve.sel(ranking=name).values, marker="o", label=str(name))
    ax.set_xlabel("units ablated")
    ax.set_ylabel(f"share of {curve.attrs.get('concept', 'concept')} removed")
    ax.set_ylim(-0.05, 1.05)
    ax.legend()
    fig.tight_layout()
    try:
        return _atomic_png(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)


def plot_context(
    heat: xr.DataArray, table: pd.DataFrame, images: np.ndarray, heat_path, bar_path
) -> tuple[Path, Path]:
    """Context test pictures: each image with its insertion-effect heatmap over it, and
    the mean effect by context class (thesis figure 4-11)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = images.shape[0]
    h, w = images.shape[1:3]
    fig, axes = plt.subplots(1, n, figsize=(2.2 * n, 2.4), squeeze=False)
    for i, ax in enumerate(axes[0]):
        ax.imshow(images[i])
        ax.imshow(
            heat.values[i], cmap="magma", alpha=0.55, vmin=0, vmax=1,
            extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="nearest",
        )  # fmt: skip
        ax.set_axis_off()
    fig.suptitle(f"where inserting {heat.attrs.get('concept', '')} units makes it appear")
    fig.tight_layout()
    try:
        first = _atomic_png(heat_path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.bar(table["context"].astype(str), table["mean"].to_numpy())
    ax.set_ylabel("mean effect of insertion")
    ax.set_xlabel("class at the location")
    ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    try:
        second = _atomic_png(bar_path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
    return first, second
