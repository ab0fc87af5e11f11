"""A small, fast, reproducible random source for scene layouts.

Layouts make hundreds of scalar random choices per image; numpy's Generator costs
microseconds per scalar call, Python's Mersenne Twister tens of nanoseconds. Every
draw here is derived from ``random.Random.random()``, whose sequence for a given
integer seed Python guarantees not to change across versions.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping, Sequence
from typing import TypeVar

T = TypeVar("T")


class Rand:
    """Random draws for one sample, seeded by a tuple of non-negative ints."""

    def __init__(self, *key: int) -> None:
        digest = hashlib.sha256(":".join(str(int(k)) for k in key).encode()).digest()
        self._random = random.Random(int.from_bytes(digest[:8], "little")).random

    def random(self) -> float:
        """Uniform in [0, 1)."""
        return self._random()

    def uniform(self, lo: float, hi: float) -> float:
        """Uniform in [lo, hi)."""
        return lo + (hi - lo) * self._random()

    def integers(self, lo: int, hi: int | None = None) -> int:
        """Uniform integer in [lo, hi) (or [0, lo) when ``hi`` is None)."""
        if hi is None:
            lo, hi = 0, lo
        return min(hi - 1, lo + int((hi - lo) * self._random()))

    def choice(self, options: Sequence[T] | Mapping[T, float]) -> T:
        """One of ``options``: uniform over a sequence, weighted by a mapping's values."""
        if not isinstance(options, Mapping):
            return options[self.integers(len(options))]
        u = self._random() * sum(options.values())
        last = None
        for name, weight in options.items():
            last = name
            u -= weight
            if u < 0:
                return name
        return last

    def gumbel(self, n: int) -> list[float]:
        """``n`` standard Gumbel draws."""
        return [-math.log(-math.log(max(self._random(), 1e-300))) for _ in range(n)]
