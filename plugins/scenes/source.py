"""The ``Scenes`` concept source: procedural scenes rendered on demand, with exact labels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from nethook.sources import ConceptSource, concept_frame

from .concepts import CATEGORIES, IMAGE_CATEGORIES, concept_rows, scene_id
from .layout import Layout, render, sample_layout
from .rand import Rand

#: Per-channel mean and std of scene images (400 images of seed 0, rounded to 0.01).
NORMALIZATION = ((0.49, 0.56, 0.48), (0.31, 0.24, 0.32))

_FREQUENCY_CACHE: dict[str, np.ndarray] = {}

VERSION = 1
"""Generator version, part of the fingerprint: bump it whenever the output for a spec changes."""

#: Noise is a crop of a per-(seed, size) Gaussian field, offset by up to this many pixels.
NOISE_PAD = 64


def parse_size(size: int | str | tuple[int, int] | list[int]) -> tuple[int, int]:
    """(height, width) from ``128``, ``"128"``, ``"128x96"`` (HxW) or ``(128, 96)``."""
    try:
        if isinstance(size, str):
            parts = [int(p) for p in size.lower().split("x")]
        elif isinstance(size, int):
            parts = [size]
        else:
            parts = [int(p) for p in size]
        if len(parts) == 1:
            parts = parts * 2
        if len(parts) != 2 or min(parts) < 1:
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(
            f"scenes: size={size!r} is not an image size; expected N or HxW with positive ints"
        ) from None
    return parts[0], parts[1]


class Scenes(ConceptSource):
    """``n`` procedural scenes of ``size`` pixels, deterministic for ``seed``.

    Dense categories object, part, material and color (one label layer each);
    whole-image category scene. See ``docs/scenes.md`` for the concept table.
    """

    categories = CATEGORIES
    image_categories = IMAGE_CATEGORIES

    def __init__(
        self,
        n: int = 2000,
        size: int | str | tuple[int, int] = 128,
        seed: int = 0,
        noise: float = 0.02,
        progress: bool = True,
    ) -> None:
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"scenes: n={n!r}; expected a non-negative number of images")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"scenes: seed={seed!r}; expected a non-negative integer")
        if not isinstance(noise, (int, float)) or not 0 <= noise < 1:
            raise ValueError(f"scenes: noise={noise!r}; expected a pixel std in [0, 1)")
        self.n = n
        self.height, self.width = parse_size(size)
        self.seed = seed
        self.noise = float(noise)
        self.progress = progress
        self._bank: np.ndarray | None = None

    @property
    def normalization(self):
        """(mean, std) per channel the demo models trained on scenes expect."""
        return NORMALIZATION

    def __len__(self) -> int:
        return self.n

    def layout(self, index: int) -> Layout:
        """The scene layout of sample ``index`` (independent of image size)."""
        if not 0 <= index < self.n:
            raise IndexError(f"scenes: index {index} out of range [0, {self.n})")
        return sample_layout(Rand(self.seed, index))

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        lay = self.layout(index)
        canvas = render(lay, self.height, self.width)
        image = canvas.image()
        if self.noise > 0:
            rand = Rand(self.seed, index, 1)
            dy, dx = rand.integers(NOISE_PAD + 1), rand.integers(NOISE_PAD + 1)
            image += self._noise_bank()[:, dy : dy + self.height, dx : dx + self.width]
            np.clip(image, 0.0, 1.0, out=image)
        labels = torch.from_numpy(canvas.labels())
        return {
            "image": torch.from_numpy(image),
            "labels": {cat: labels[i : i + 1] for i, cat in enumerate(CATEGORIES)},
            "image_labels": {"scene": torch.tensor([scene_id(lay.scene)], dtype=torch.int64)},
            "index": index,
        }

    def _noise_bank(self) -> np.ndarray:
        """Gaussian pixel noise for this seed and size; each image adds a shifted crop."""
        if self._bank is None:
            rng = np.random.default_rng([self.seed, self.height, self.width])
            shape = (3, self.height + NOISE_PAD, self.width + NOISE_PAD)
            self._bank = rng.standard_normal(shape, dtype=np.float32) * np.float32(self.noise)
        return self._bank

    def fingerprint_parts(self) -> dict:
        """Everything that decides the content: generator version, n, size, seed, noise."""
        return {
            "version": VERSION,
            "n": self.n,
            "size": [self.height, self.width],
            "seed": self.seed,
            "noise": self.noise,
        }

    def _tally(self, size: int) -> np.ndarray:
        """Images per concept id, from rendered labels only (noise never changes labels)."""
        counts = np.zeros(size, dtype=np.int64)
        for i in tqdm(
            range(self.n), desc="scenes concept frequency", disable=not self.progress, leave=False
        ):
            lay = self.layout(i)
            counts[render(lay, self.height, self.width).present()] += 1
            counts[scene_id(lay.scene)] += 1
        return counts

    def concepts(self) -> pd.DataFrame:
        """Concept table; frequency = number of images showing the concept (tallied once)."""
        rows = concept_rows()
        key = self.fingerprint()
        if key not in _FREQUENCY_CACHE:
            _FREQUENCY_CACHE[key] = self._tally(len(rows) + 1)
        counts = _FREQUENCY_CACHE[key]
        ids, names, cats = zip(*rows, strict=True)
        return concept_frame(ids, names, cats, counts[list(ids)])
