"""Scene layouts: which backgrounds and objects a scene has, where, and its scene label.

A layout is sampled from a random generator alone (no image size), so one sample
index gives the same scene at every resolution. The generator first picks an
intended scene type and fills it with typical objects (plus occasional
distractors); the scene *label* is then decided from the objects that were
placed: each scene scores the object counts with fixed weights, Gumbel noise is
added, and the best score wins. A scene classifier therefore has to find the
objects, and some images are honestly ambiguous.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .canvas import Canvas, Paint, solid, textured
from .concepts import SCENES, object_id
from .objects import Instance, draw_object, sample_object
from .rand import Rand

#: Scene score per object of each kind (counts are capped at ``COUNT_CAP``).
SCENE_WEIGHTS: dict[str, dict[str, float]] = {
    "street": {"car": 1.6, "house": 1.2, "person": 0.3},
    "farm": {"cow": 2.0, "fence": 1.0, "house": 0.4, "tree": 0.2},
    "beach": {"boat": 1.6, "umbrella": 1.8, "person": 0.3},
    "forest": {"tree": 0.75},
    "park": {"person": 0.9, "tree": 0.35, "fence": 0.5},
    "kitchen": {"table": 1.5, "chair": 1.0, "cabinet": 1.8, "person": 0.3},
}
COUNT_CAP = 4
LABEL_NOISE = 0.5
SKY_KINDS = ("sun", "cloud", "mountain")


@dataclass
class Layout:
    """Background rectangles, objects in drawing order, intended scene and scene label."""

    intended: str
    scene: str = ""
    backgrounds: list[tuple[str, tuple[float, float, float, float], Paint]] = field(
        default_factory=list
    )
    objects: list[Instance] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Number of placed objects of each kind."""
        out: dict[str, int] = {}
        for inst in self.objects:
            out[inst.kind] = out.get(inst.kind, 0) + 1
        return out


def scene_scores(counts: dict[str, int]) -> np.ndarray:
    """Noise-free score of every scene (in ``SCENES`` order) for object counts."""
    return np.array(
        [
            sum(w * min(counts.get(k, 0), COUNT_CAP) for k, w in SCENE_WEIGHTS[s].items())
            for s in SCENES
        ]
    )


def _place(
    rng: Rand,
    layout: Layout,
    kind: str,
    count: int | bool,
    ylo: float,
    yhi: float,
    scale: Callable[[float], float],
    xlo: float = 0.05,
    xhi: float = 0.95,
) -> None:
    """Add ``count`` objects of ``kind`` standing between rows ylo..yhi, sized by ``scale``."""
    for _ in range(int(count)):
        y = rng.uniform(ylo, max(ylo, yhi))
        layout.objects.append(sample_object(rng, kind, y, rng.uniform(xlo, xhi), scale(y)))


def _outdoor(rng: Rand, scene: str) -> Layout:
    lay = Layout(scene)
    hz = rng.uniform(0.3, 0.55)

    def scale(y: float) -> float:
        return 0.45 + 1.3 * (y - hz) / (1 - hz)

    sky = rng.choice({"blue": 0.7, "grey": 0.12, "orange": 0.1, "white": 0.08})
    lay.backgrounds.append(("sky", (0.0, 0.0, hz, 1.0), solid(rng, sky)))
    grass = solid(rng, rng.choice({"green": 0.85, "yellow": 0.08, "brown": 0.07}))
    ground_top = hz
    if scene == "beach":
        shore = hz + rng.uniform(0.15, 0.4) * (1 - hz)
        water = (
            textured(rng, "ripple", "blue", rng.choice({"white": 1, "blue": 1}), 0.03)
            if rng.random() < 0.7
            else solid(rng, "blue")
        )
        sand = solid(rng, rng.choice({"yellow": 0.7, "white": 0.15, "orange": 0.15}))
        lay.backgrounds += [
            ("water", (hz, 0.0, shore, 1.0), water),
            ("sand", (shore, 0.0, 1.0, 1.0), sand),
        ]
        ground_top = shore
    elif scene == "street" and rng.random() < 0.75:
        road_top = hz + rng.uniform(0.05, 0.25) * (1 - hz)
        road = solid(rng, rng.choice({"grey": 0.8, "black": 0.2}))
        lay.backgrounds += [
            ("grass", (hz, 0.0, road_top, 1.0), grass),
            ("road", (road_top, 0.0, 1.0, 1.0), road),
        ]
        ground_top = road_top
    elif scene == "farm" and rng.random() < 0.2:
        lay.backgrounds.append(("sand", (hz, 0.0, 1.0, 1.0), solid(rng, "yellow")))
    else:
        lay.backgrounds.append(("grass", (hz, 0.0, 1.0, 1.0), grass))
        if scene in ("park", "street") and rng.random() < 0.5:
            top = rng.uniform(0.82, 0.92)
            lay.backgrounds.append(("road", (top, 0.0, 1.0, 1.0), solid(rng, "grey")))

    p_mountain = {"farm": 0.5, "forest": 0.35, "park": 0.2, "beach": 0.15, "street": 0.1}[scene]
    for _ in range(int(rng.random() < p_mountain) * int(rng.integers(1, 3))):
        lay.objects.append(sample_object(rng, "mountain", hz, rng.uniform(0.1, 0.9), 1.0))
    if rng.random() < 0.3:
        lay.objects.append(
            sample_object(rng, "sun", rng.uniform(0.06, hz - 0.05), rng.uniform(0.1, 0.9), 1.0)
        )
    _place(rng, lay, "cloud", rng.integers(0, 4), 0.06, hz - 0.08, lambda y: 1.0)

    near = (hz + 0.02, hz + 0.15 * (1 - hz))
    ground = (ground_top + 0.03, 0.98)
    if scene == "street":
        _place(rng, lay, "house", rng.integers(1, 4), *near, scale)
        _place(rng, lay, "car", rng.integers(1, 4), *ground, scale)
        _place(rng, lay, "person", rng.integers(0, 3), *ground, scale)
        _place(rng, lay, "tree", rng.integers(0, 3), *near, scale)
    elif scene == "farm":
        _place(rng, lay, "cow", rng.integers(1, 5), hz + 0.1, 0.95, scale)
        _place(rng, lay, "fence", rng.random() < 0.7, hz + 0.05, 0.9, scale)
        _place(rng, lay, "house", rng.random() < 0.5, *near, scale)
        _place(rng, lay, "tree", rng.integers(0, 3), *near, scale)
    elif scene == "beach":
        boats = int(rng.integers(0, 3))
        umbrellas = int(rng.integers(0 if boats else 1, 4))
        _place(rng, lay, "boat", boats, hz + 0.03, ground_top - 0.01, scale)
        _place(rng, lay, "umbrella", umbrellas, *ground, scale)
        _place(rng, lay, "person", rng.integers(0, 4), *ground, scale)
    elif scene == "forest":
        _place(rng, lay, "tree", rng.integers(4, 9), hz + 0.02, 0.98, scale)
        _place(rng, lay, "person", rng.random() < 0.2, *ground, scale)
    elif scene == "park":
        _place(rng, lay, "tree", rng.integers(1, 4), hz + 0.02, 0.9, scale)
        _place(rng, lay, "person", rng.integers(1, 5), *ground, scale)
        _place(rng, lay, "fence", rng.random() < 0.35, hz + 0.05, 0.9, scale)
        _place(rng, lay, "umbrella", rng.random() < 0.1, *ground, scale)
    if rng.random() < 0.2:
        kind = rng.choice({"car": 1, "cow": 1, "house": 1, "person": 1, "tree": 1, "umbrella": 1})
        _place(rng, lay, kind, 1, *ground, scale)
    return lay


def _indoor(rng: Rand) -> Layout:
    lay = Layout("kitchen")
    fy = rng.uniform(0.5, 0.75)

    def scale(y: float) -> float:
        return 0.8 + 1.0 * (y - fy) / (1 - fy)

    wall_term = rng.choice({"white": 3, "yellow": 1, "blue": 1, "pink": 1, "green": 1, "grey": 1})
    if rng.random() < 0.4 and wall_term != "white":
        wall = textured(rng, rng.choice({"stripes": 1, "dots": 1}), wall_term, "white", 0.04)
    else:
        wall = solid(rng, wall_term)
    kind = rng.random()
    if kind < 0.4:
        a, b = [("white", "black"), ("white", "red"), ("grey", "white")][int(rng.integers(3))]
        floor = textured(rng, "checker", a, b, 0.06)
    elif kind < 0.75:
        floor = textured(rng, "wood", "brown", "brown", 0.04)
    else:
        floor = solid(rng, rng.choice({"grey": 1, "brown": 1, "white": 1}))
    lay.backgrounds += [
        ("room wall", (0.0, 0.0, fy, 1.0), wall),
        ("floor", (fy, 0.0, 1.0, 1.0), floor),
    ]
    cabinets = int(rng.integers(0, 3))
    tables = int(rng.random() < (0.7 if cabinets else 1.0))
    _place(rng, lay, "cabinet", cabinets, fy, fy + 0.04, scale)
    _place(rng, lay, "table", tables, fy + 0.15, 0.95, scale, 0.2, 0.8)
    _place(rng, lay, "chair", rng.integers(0, 4), fy + 0.1, 0.98, scale)
    _place(rng, lay, "person", rng.random() < 0.3, fy + 0.1, 0.98, scale)
    return lay


def sample_layout(rng: Rand) -> Layout:
    """A random scene layout with its label (see the module docstring)."""
    intended = SCENES[int(rng.integers(len(SCENES)))]
    lay = _indoor(rng) if intended == "kitchen" else _outdoor(rng, intended)
    sky = [o for o in lay.objects if o.kind in SKY_KINDS]
    ground = sorted((o for o in lay.objects if o.kind not in SKY_KINDS), key=lambda o: o.y)
    lay.objects = sorted(sky, key=lambda o: SKY_KINDS.index(o.kind)) + ground
    noise = np.array(rng.gumbel(len(SCENES))) * LABEL_NOISE
    lay.scene = SCENES[int(np.argmax(scene_scores(lay.counts()) + noise))]
    return lay


def render(layout: Layout, height: int, width: int) -> Canvas:
    """Paint ``layout`` at ``height`` x ``width`` (no noise); labels come with it."""
    canvas = Canvas(height, width)
    for name, box, paint in layout.backgrounds:
        canvas.paint(box, paint, object_id(name))
    for inst in layout.objects:
        draw_object(canvas, inst)
    return canvas
