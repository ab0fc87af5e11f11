"""Fixtures for the GAN dissection tests: the planted generator and color segmenter."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from gan_planted import ColorSegmenter, PlantedGenerator  # noqa: E402


@pytest.fixture(scope="module")
def planted():
    """``(generator, segmenter)`` with known causal units (see ``gan_planted``)."""
    return PlantedGenerator().eval(), ColorSegmenter()
