"""A plain Fréchet Segmentation Distance (FSD) between two sets of images.

Each image becomes the vector of the shares of its pixels that a segmenter gives
each class of one category (``object`` by default); FSD is the Fréchet distance
between Gaussians fitted to the two sets of vectors,
``|mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))``, on shares in [0, 1]
(multiply by 1e4 for the scale of shares in percent). Means and covariances are
the streaming :class:`~nethook.stats.moments.Covariance` stat.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import scipy.linalg
import torch

from nethook.sources import Segmenter
from nethook.stats.moments import Covariance


def class_shares(
    segmenter: Segmenter, images: torch.Tensor, category: str = "object"
) -> torch.Tensor:
    """``[B, K]`` share of each image's pixels per concept id of ``category`` (first layer)."""
    table = segmenter.concepts()
    ids = table.loc[table["category"] == category, "id"].to_numpy()
    if len(ids) == 0:
        raise ValueError(f"segmenter has no concepts of category {category!r}")
    labels = segmenter.segment(images)[category][:, 0]
    flat = labels.reshape(labels.shape[0], -1)
    onehot = flat[:, :, None] == torch.tensor(ids, device=flat.device)[None, None]
    return onehot.float().mean(dim=1)


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """Fréchet distance between Gaussians ``N(mu1, cov1)`` and ``N(mu2, cov2)``."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    root = scipy.linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(root).all():
        eps = np.eye(len(mu1)) * 1e-9
        root = scipy.linalg.sqrtm((cov1 + eps) @ (cov2 + eps))
    root = np.real(root)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1 + cov2 - 2 * root))


def segment_statistics(
    segmenter: Segmenter, batches: Iterable[torch.Tensor], category: str = "object"
) -> Covariance:
    """Mean and covariance of the class-share vectors of image batches ``[B, 3, H, W]``."""
    stat = Covariance(dtype=torch.float64)
    for images in batches:
        stat.update(class_shares(segmenter, images, category).double())
    return stat


def fsd(
    segmenter: Segmenter,
    first: Iterable[torch.Tensor],
    second: Iterable[torch.Tensor],
    category: str = "object",
) -> float:
    """FSD between two streams of image batches (in [0, 1])."""
    a = segment_statistics(segmenter, first, category)
    b = segment_statistics(segmenter, second, category)
    return frechet_distance(
        a.mean().cpu().numpy(), a.covariance().cpu().numpy(),
        b.mean().cpu().numpy(), b.covariance().cpu().numpy(),
    )  # fmt: skip
