"""Fréchet Segmentation Distance (FSD): which classes a generator draws too rarely or never.

Every image (generated or real) is segmented and reduced to the vector of the
shares of its pixels that each class of one category takes (``object`` by
default). The mean and covariance of these vectors on each side are streaming
:class:`~nethook.stats.moments.Covariance` stats (mergeable, so shards computed
anywhere, e.g. on Dask workers, combine exactly) and the FSD is the Fréchet
distance between the two fitted Gaussians,
``|mu_g - mu_t|^2 + Tr(S_g + S_t - 2 (S_g S_t)^(1/2))`` (METHODS.md §3; the thesis
reports it on shares in percent, i.e. ours times 1e4).

Every FSD comes with its noise floor: the FSD between two disjoint real samples
of the same size, the smallest difference the sample size can resolve.
"""

from __future__ import annotations

import html
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.linalg
import torch
import xarray as xr
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from nethook.atomic import atomic_path, write_text
from nethook.gandissect import latents
from nethook.models import model_device
from nethook.stats.moments import Covariance

PERCENT2 = 1e4  # shares -> shares in percent, squared (the thesis's scale)


# ---------------------------------------------------------------------------
# The distance


def sqrtm_product(a: np.ndarray, b: np.ndarray, eps: float = 1e-10) -> np.ndarray:
    """Matrix square root of ``a @ b`` for covariance matrices ``a``, ``b`` (real part).

    ``scipy.linalg.sqrtm`` of a singular product (a class that never appears gives
    a zero row and column) can return non-finite values or a large imaginary
    part; then ``eps * I`` is added to both factors and the root retried with a
    growing ``eps``. Imaginary parts that remain are round-off only if they are
    tiny relative to the root; a large one raises ``ArithmeticError``.
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    eye = np.eye(len(a))
    shift = 0.0
    scale = max(float(np.abs(a).max(initial=0.0)), float(np.abs(b).max(initial=0.0)), 1e-300)
    for _ in range(8):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            root = scipy.linalg.sqrtm((a + shift * eye) @ (b + shift * eye))
        root = np.asarray(root)
        if np.isfinite(root).all():
            imag = np.abs(root.imag).max(initial=0.0) if np.iscomplexobj(root) else 0.0
            size = np.abs(root).max(initial=0.0)
            if imag <= 1e-6 * max(size, scale):
                return np.real(root)
        shift = eps * scale if shift == 0.0 else shift * 100
    raise ArithmeticError(
        f"sqrtm of the covariance product failed even with eps={shift / 100:g} * I added"
    )


def trace_sqrt_product_eig(a: np.ndarray, b: np.ndarray) -> float:
    """``Tr((a b)^(1/2))`` by symmetric eigendecompositions (the reference route).

    For positive semi-definite ``a``, ``b`` the eigenvalues of ``a b`` equal those
    of the symmetric ``a^(1/2) b a^(1/2)``, so the trace of the root is the sum of
    their square roots; negative round-off eigenvalues are clipped to zero.
    """
    wa, va = np.linalg.eigh(np.asarray(a, np.float64))
    root_a = (va * np.sqrt(np.clip(wa, 0, None))) @ va.T
    w = np.linalg.eigvalsh(root_a @ np.asarray(b, np.float64) @ root_a)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def frechet_distance(mu1: Any, cov1: Any, mu2: Any, cov2: Any, method: str = "sqrtm") -> float:
    """Fréchet distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)``.

    ``method`` is ``"sqrtm"`` (:func:`sqrtm_product`) or ``"eig"``
    (:func:`trace_sqrt_product_eig`); both agree on positive semi-definite input.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != mu1.shape * 2:
        raise ValueError(
            f"frechet_distance: shapes disagree: mu {mu1.shape} vs {mu2.shape}, "
            f"cov {cov1.shape} vs {cov2.shape}"
        )
    if method == "sqrtm":
        tr_root = float(np.trace(sqrtm_product(cov1, cov2)))
    elif method == "eig":
        tr_root = trace_sqrt_product_eig(cov1, cov2)
    else:
        raise ValueError(f"frechet_distance: method must be 'sqrtm' or 'eig', got {method!r}")
    value = float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * tr_root)
    return max(value, 0.0)


def stat_distance(a: Covariance, b: Covariance, method: str = "sqrtm") -> float:
    """Fréchet distance between the Gaussians of two :class:`Covariance` stats."""
    return frechet_distance(
        a.mean().cpu().numpy(),
        a.covariance().cpu().numpy(),
        b.mean().cpu().numpy(),
        b.covariance().cpu().numpy(),
        method=method,
    )


# ---------------------------------------------------------------------------
# Segmentation statistics


def class_table(segmenter: Any, category: str = "object") -> pd.DataFrame:
    """Concepts (``id``, ``name``) of ``category`` the segmenter labels, by id."""
    table = segmenter.concepts()
    rows = table.loc[table["category"] == category, ["id", "name"]]
    if rows.empty:
        cats = sorted(set(table["category"]))
        raise ValueError(f"segmenter has no concepts of category {category!r}; it has {cats}")
    return rows.sort_values("id").reset_index(drop=True)


def check_label_sets(generated: Sequence[str], real: Sequence[str]) -> None:
    """Raise ``ValueError`` naming the classes only one side has, if the sets differ."""
    only_g = sorted(set(generated) - set(real))
    only_r = sorted(set(real) - set(generated))
    if only_g or only_r:
        raise ValueError(
            "generated and real label sets disagree: "
            f"only in generated {only_g}, only in real {only_r}"
        )


def class_fractions(
    segmenter: Any, images: torch.Tensor, ids: Sequence[int], category: str = "object"
) -> torch.Tensor:
    """``[B, K]`` share of each image's pixels labelled with concept ``ids[k]`` (first layer)."""
    labels = segmenter.segment(images)[category][:, 0]
    flat = labels.reshape(labels.shape[0], -1)
    ids_t = torch.as_tensor(list(ids), device=flat.device)
    return (flat[:, :, None] == ids_t[None, None]).double().mean(dim=1)


def segment_statistics(
    segmenter: Any,
    batches: Iterable[torch.Tensor],
    ids: Sequence[int],
    category: str = "object",
    progress: bool = False,
    desc: str = "segment",
    total: int | None = None,
) -> Covariance:
    """Mean and covariance of the class-share vectors of image batches ``[B, 3, H, W]``.

    For batches already in memory; :func:`share_statistics` runs a source through
    the runner (locally or on Dask) instead.
    """
    stat = Covariance(dtype=torch.float64)
    with torch.no_grad():
        for images in tqdm(batches, desc=desc, total=total, disable=not progress):
            stat.update(class_fractions(segmenter, images, ids, category).cpu())
    return stat


class ClassShares(nn.Module):
    """Images ``[B, 3, H, W]`` in [0, 1] -> ``[B, K]`` pixel shares of classes ``ids``.

    A module so the runner can trace it (layer ``shares`` of :class:`ShareModel`).
    """

    def __init__(self, segmenter: Any, ids: Sequence[int], category: str = "object") -> None:
        super().__init__()
        self.segmenter = segmenter
        self.ids = [int(i) for i in ids]
        self.category = category

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return class_fractions(self.segmenter, images, self.ids, self.category)


class ShareModel(nn.Module):
    """What the runner runs for FSD: images, or latents through ``generator``, -> class shares.

    With a ``generator`` the input is ``z [B, Z]`` and the images are
    ``generator(z).clamp(0, 1)``; without, the input is the images. The shares are
    the output of the submodule ``shares`` (:class:`ClassShares`). ``device`` places
    a model without a generator (the runner moves each batch to the model's device).
    """

    def __init__(
        self,
        segmenter: Any,
        ids: Sequence[int],
        category: str = "object",
        generator: nn.Module | None = None,
        device: Any = None,
    ) -> None:
        super().__init__()
        self.generator = generator
        self.shares = ClassShares(segmenter, ids, category)
        if device is None and generator is not None:
            device = model_device(generator)
        self.register_buffer("anchor", torch.zeros(0, device=device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = self.generator(x).clamp(0, 1) if self.generator is not None else x
        return self.shares(images)


class LatentSource(Dataset):
    """The latents ``z [n, z_dim]`` :func:`generated_batches` draws: standard normal from ``seed``."""

    def __init__(self, n: int, z_dim: int, seed: int = 0) -> None:
        self.z = latents(n, z_dim, seed)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.z)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.z[i]


class ImageItems(Dataset):
    """The images of ``source`` (a ConceptSource, an ``(image, label)`` or image dataset), bare.

    Segmenters take images in [0, 1]; the runner would normalize a concept
    source's images for a classifier, so FSD runs this view of the source.
    """

    def __init__(self, source: Any) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.source[i]
        if isinstance(item, dict):
            return item["image"]
        return item[0] if isinstance(item, list | tuple) else item


def share_statistics(
    model: ShareModel,
    source: Dataset,
    samples: int,
    *,
    start: int = 0,
    batch_size: int = 100,
    shard_samples: int | None = None,
    client: Any = None,
    progress: bool = False,
    desc: str = "segment",
) -> Covariance:
    """Mean and covariance of ``model``'s share vectors over ``source[start : start + samples]``.

    The runner feeds the traced ``shares`` output of each batch into a
    :class:`Covariance` stat, shard by shard (``shard_samples``, default 8
    batches), and the shards' stats merge in :mod:`nethook.scale`'s fixed tree:
    here with ``client=None``, on a Dask cluster with a ``distributed.Client`` or
    a scheduler address. Both give the same bits.
    """
    from nethook.runner import StatConsumer
    from nethook.scale import tally_source

    consumers = {"shares": StatConsumer(Covariance(dtype=torch.float64), "shares")}
    out = tally_source(
        model,
        source,
        consumers,
        client=client,
        samples=samples,
        start=start,
        batch_size=batch_size,
        shard_samples=shard_samples,
        progress=progress,
        desc=desc,
    )
    return out["shares"].stat


def generated_batches(
    generator: torch.nn.Module,
    n: int,
    batch_size: int = 100,
    seed: int = 0,
    z_dim: int | None = None,
) -> Iterable[torch.Tensor]:
    """``n`` images from ``generator`` on standard normal ``z`` (a pure function of ``seed``)."""
    z_dim = z_dim or getattr(generator, "z_dim", None)
    if z_dim is None:
        raise ValueError("generator has no z_dim attribute; pass z_dim")
    device = model_device(generator)
    z = latents(n, z_dim, seed)
    with torch.no_grad():
        for i in range(0, n, batch_size):
            yield generator(z[i : i + batch_size].to(device)).clamp(0, 1)


def real_batches(
    source: Any, indices: Sequence[int], batch_size: int = 100, device: Any = "cpu"
) -> Iterable[torch.Tensor]:
    """Images ``[B, 3, H, W]`` of ``source`` (a ConceptSource or image dataset) at ``indices``."""
    for i in range(0, len(indices), batch_size):
        items = [source[j] for j in indices[i : i + batch_size]]
        images = [it["image"] if isinstance(it, dict) else it for it in items]
        yield torch.stack(images).to(device)


# ---------------------------------------------------------------------------
# The measurement


def fsd_dataset(
    names: Sequence[str],
    generated: Covariance,
    real: Covariance,
    real_holdout: Covariance,
    drop_ratio: float = 0.1,
    min_share: float = 1e-3,
) -> xr.Dataset:
    """Results of an FSD run as an xarray Dataset over dim ``concept``.

    Variables: ``mean_generated``, ``mean_real`` (pixel shares), ``cov_generated``,
    ``cov_real`` (dims ``concept``, ``concept2``), ``dropped`` (real share at least
    ``min_share`` and generated share below ``drop_ratio`` times it). Attributes:
    ``fsd``, ``fsd_floor`` (disjoint real vs real), ``fsd_percent``/``fsd_floor_percent``
    (the thesis's scale), ``samples``.
    """
    mg = generated.mean().cpu().numpy()
    mr = real.mean().cpu().numpy()
    dropped = (mr >= min_share) & (mg < drop_ratio * mr)
    value = stat_distance(generated, real)
    floor = stat_distance(real_holdout, real)
    coords = {"concept": list(names), "concept2": list(names)}
    return xr.Dataset(
        {
            "mean_generated": ("concept", mg),
            "mean_real": ("concept", mr),
            "cov_generated": (("concept", "concept2"), generated.covariance().cpu().numpy()),
            "cov_real": (("concept", "concept2"), real.covariance().cpu().numpy()),
            "dropped": ("concept", dropped),
        },
        coords=coords,
        attrs={
            "fsd": value,
            "fsd_floor": floor,
            "fsd_percent": value * PERCENT2,
            "fsd_floor_percent": floor * PERCENT2,
            "samples": int(generated.count),
            "drop_ratio": drop_ratio,
            "min_share": min_share,
        },
    )


def measure_fsd(
    generator: torch.nn.Module,
    source: Any,
    segmenter: Any,
    samples: int = 10000,
    *,
    category: str = "object",
    batch_size: int = 100,
    seed: int = 0,
    generated_segmenter: Any | None = None,
    cache_dir: str | os.PathLike | None = None,
    client: Any = None,
    shard_samples: int | None = None,
    progress: bool = True,
) -> xr.Dataset:
    """FSD of ``generator`` against ``source`` with its noise floor (:func:`fsd_dataset`).

    Uses ``samples`` generated images and ``2 * samples`` real ones: the first
    half is the reference, the second the disjoint sample for the floor. Real and
    generated images are segmented by ``segmenter`` (or generated ones by
    ``generated_segmenter``, whose label set must then be the same). Each side's
    statistics are gathered by :func:`share_statistics` (the runner, shard by
    shard; on a Dask cluster when ``client`` is a ``distributed.Client`` or a
    scheduler address, with the same result). With ``cache_dir`` each side's
    statistics are cached under a content key of the models, source, segmenter
    and settings.
    """
    if samples < 2:
        raise ValueError(f"samples must be >= 2 for a covariance, got {samples}")
    if len(source) < 2 * samples:
        raise ValueError(
            f"real source has {len(source)} images; FSD with its noise floor needs "
            f"2 * samples = {2 * samples} (two disjoint real samples of {samples})"
        )
    z_dim = getattr(generator, "z_dim", None)
    if z_dim is None:
        raise ValueError("generator has no z_dim attribute (the size of the z it takes)")
    gen_seg = generated_segmenter or segmenter
    table = class_table(segmenter, category)
    check_label_sets(class_table(gen_seg, category)["name"].tolist(), table["name"].tolist())
    gen_table = class_table(gen_seg, category).set_index("name")
    gen_ids = [int(gen_table.loc[name, "id"]) for name in table["name"]]
    device = model_device(generator)
    options = {"batch_size": batch_size, "shard_samples": shard_samples, "client": client,
               "progress": progress}  # fmt: skip
    real_model = ShareModel(segmenter, table["id"].tolist(), category, device=device)
    real_items = ImageItems(source)

    def gen_stat() -> Covariance:
        model = ShareModel(gen_seg, gen_ids, category, generator=generator)
        latents = LatentSource(samples, z_dim, seed)
        return share_statistics(model, latents, samples, desc="generated", **options)

    def real_stat(first: int) -> Callable[[], Covariance]:
        def compute() -> Covariance:
            return share_statistics(real_model, real_items, samples, start=first, desc="real",
                                    **options)  # fmt: skip

        return compute

    computes = {"generated": gen_stat, "real": real_stat(0), "real_holdout": real_stat(samples)}
    stats = {}
    for side, compute in computes.items():
        if cache_dir is None:
            stats[side] = compute()
        else:
            stats[side] = _cached(cache_dir, side, compute, generator, source, segmenter,
                                  gen_seg, samples, category, seed)  # fmt: skip
    return fsd_dataset(table["name"].tolist(), stats["generated"], stats["real"],
                       stats["real_holdout"])  # fmt: skip


def _fingerprint(obj: Any) -> str:
    if hasattr(obj, "fingerprint"):
        return str(obj.fingerprint())
    return type(obj).__qualname__


def _cached(cache_dir, side, compute, generator, source, segmenter, gen_seg, samples,
            category, seed) -> Covariance:  # fmt: skip
    from nethook.hashing import content_key, hash_model
    from nethook.stats.persist import cached

    parts: dict[str, Any] = {
        "side": side,
        "samples": samples,
        "category": category,
        "segmenter": _fingerprint(segmenter if side != "generated" else gen_seg),
    }
    if side == "generated":
        parts.update(model=hash_model(generator), seed=seed)
    else:
        parts.update(source=_fingerprint(source))
    key = content_key(**parts)
    return cached(Path(cache_dir) / f"fsd-{side}-{key[:16]}.npz", key, compute)


def format_fsd(ds: xr.Dataset) -> str:
    """One line: FSD beside its noise floor, in shares and in the thesis's percent scale."""
    a = ds.attrs
    return (
        f"FSD {a['fsd']:.6f} (x1e4: {a['fsd_percent']:.2f})   "
        f"noise floor, real vs real, n={a['samples']}: {a['fsd_floor']:.6f} "
        f"(x1e4: {a['fsd_floor_percent']:.2f})"
    )


# ---------------------------------------------------------------------------
# Figure and report


def frequency_plot(ds: xr.Dataset, path: str | os.PathLike) -> Path:
    """Per-class pixel share, generated vs real, sorted by real share (thesis fig. 5-2).

    Classes the generator drops (``ds.dropped``) are marked in red with a cross.
    Written atomically as PNG; returns the path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(-ds["mean_real"].values, kind="stable")
    names = [str(n) for n in ds["concept"].values[order]]
    real = ds["mean_real"].values[order]
    gen = ds["mean_generated"].values[order]
    dropped = ds["dropped"].values[order]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names) + 2), 4))
    ax.bar(x - 0.2, real, 0.4, label="real", color="#1f77b4")
    ax.bar(x + 0.2, gen, 0.4, label="generated", color="#ff7f0e")
    floor = max(float(real[real > 0].min(initial=1.0)) / 10, 1e-6)
    for i in np.flatnonzero(dropped):
        ax.plot(x[i] + 0.2, max(gen[i], floor), "x", color="#d62728", markersize=8)
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    for tick, drop in zip(ax.get_xticklabels(), dropped, strict=True):
        if drop:
            tick.set_color("#d62728")
    ax.set_ylabel("mean pixel share")
    ax.set_title(f"Class frequency, real vs generated (red: dropped)  {_short(ds)}")
    ax.legend()
    fig.tight_layout()
    return _save_fig(fig, Path(path))


def _short(ds: xr.Dataset) -> str:
    return f"FSD x1e4 {ds.attrs['fsd_percent']:.1f}, floor {ds.attrs['fsd_floor_percent']:.1f}"


def _save_fig(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    return path


def report_section(ds: xr.Dataset, image: str = "img/fsd_frequency.png") -> str:
    """HTML fragment: FSD beside its floor, the frequency plot and the dropped classes."""
    a = ds.attrs
    rows = "".join(
        f"<tr><td>{html.escape(str(c))}</td><td>{r:.4f}</td><td>{g:.4f}</td>"
        f"<td>{'dropped' if d else ''}</td></tr>"
        for c, r, g, d in zip(
            ds["concept"].values,
            ds["mean_real"].values,
            ds["mean_generated"].values,
            ds["dropped"].values,
            strict=True,
        )  # fmt: skip
        if r > 0 or g > 0
    )
    dropped = ", ".join(html.escape(str(c)) for c in ds["concept"].values[ds["dropped"].values])
    return (
        "<section><h2>Fréchet Segmentation Distance</h2>"
        f"<p>FSD <b>{a['fsd']:.6f}</b> (x1e4: {a['fsd_percent']:.2f}); noise floor "
        f"(two disjoint real samples of {a['samples']}): {a['fsd_floor']:.6f} "
        f"(x1e4: {a['fsd_floor_percent']:.2f}).</p>"
        f"<p>Classes the generator drops: {dropped or 'none'}.</p>"
        f'<img src="{html.escape(image)}" alt="class frequency">'
        "<table><tr><th>class</th><th>real share</th><th>generated share</th><th></th></tr>"
        f"{rows}</table></section>"
    )


def write_fsd_report(ds: xr.Dataset, out: str | os.PathLike) -> Path:
    """Write ``out/index.html`` (the FSD section), ``out/img/fsd_frequency.png``, ``fsd.nc``."""
    out = Path(out)
    frequency_plot(ds, out / "img" / "fsd_frequency.png")
    save_dataset(ds, out / "fsd.nc")
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>FSD</title></head><body>"
        f"{report_section(ds)}</body></html>"
    )
    return write_text(out / "index.html", page)


def save_dataset(ds: xr.Dataset, path: str | os.PathLike) -> Path:
    """Save an FSD dataset as netCDF atomically (``dropped`` stored as int8)."""
    out = ds.assign(dropped=ds["dropped"].astype("int8"))
    with atomic_path(path, suffix=".nc") as tmp:
        out.to_netcdf(tmp)
    return Path(path)


def load_dataset(path: str | os.PathLike) -> xr.Dataset:
    """Load a dataset written by :func:`save_dataset`."""
    with xr.open_dataset(path) as ds:
        ds = ds.load()
    return ds.assign(dropped=ds["dropped"].astype(bool))
