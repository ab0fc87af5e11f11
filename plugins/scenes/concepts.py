"""The scenes concept vocabulary: objects, parts, materials, colors, scenes and palettes.

Everything here is data. Concept ids are global and assigned in the order
objects, parts, materials, colors, scenes, starting at 1 (0 = none).
"""

from __future__ import annotations

from nethook_plugins.colors import COLOR_TERMS

OBJECTS: tuple[str, ...] = (
    "sky",
    "grass",
    "road",
    "water",
    "sand",
    "floor",
    "room wall",
    "mountain",
    "cloud",
    "sun",
    "house",
    "tree",
    "car",
    "person",
    "cow",
    "boat",
    "umbrella",
    "fence",
    "table",
    "chair",
    "cabinet",
)

#: part name -> the objects that have it (a part pixel always lies in one of them).
PART_OWNERS: dict[str, tuple[str, ...]] = {
    "roof": ("house",),
    "wall": ("house",),
    "door": ("house", "cabinet"),
    "window": ("house", "car"),
    "crown": ("tree",),
    "trunk": ("tree",),
    "body": ("car", "person", "cow"),
    "wheel": ("car",),
    "head": ("person", "cow"),
    "leg": ("person", "cow", "table", "chair"),
    "hull": ("boat",),
    "sail": ("boat",),
    "canopy": ("umbrella",),
    "pole": ("umbrella",),
    "top": ("table",),
    "seat": ("chair",),
    "back": ("chair",),
    "drawer": ("cabinet",),
}
PARTS: tuple[str, ...] = tuple(PART_OWNERS)

MATERIALS: tuple[str, ...] = ("brick", "wood", "stripes", "dots", "checker", "ripple")

#: The 11 basic color terms, as in Broden's color category (the colors segmenter's).
COLORS: tuple[str, ...] = COLOR_TERMS

SCENES: tuple[str, ...] = ("street", "farm", "beach", "forest", "park", "kitchen")

#: Representative RGB values (in [0, 1]) of each color term; the renderer picks one
#: and jitters it by at most ``COLOR_JITTER`` per channel.
PALETTE: dict[str, tuple[tuple[float, float, float], ...]] = {
    "black": ((0.06, 0.06, 0.07), (0.13, 0.12, 0.14)),
    "blue": ((0.20, 0.35, 0.85), (0.42, 0.62, 0.92), (0.12, 0.22, 0.62)),
    "brown": ((0.50, 0.30, 0.13), (0.40, 0.24, 0.10), (0.58, 0.38, 0.20)),
    "grey": ((0.50, 0.50, 0.50), (0.62, 0.62, 0.64), (0.40, 0.40, 0.42)),
    "green": ((0.22, 0.60, 0.22), (0.12, 0.44, 0.16), (0.40, 0.68, 0.26)),
    "orange": ((0.95, 0.55, 0.12), (0.90, 0.45, 0.06)),
    "pink": ((0.96, 0.62, 0.72), (0.92, 0.48, 0.62)),
    "purple": ((0.50, 0.22, 0.62), (0.40, 0.16, 0.52)),
    "red": ((0.82, 0.12, 0.12), (0.90, 0.20, 0.16), (0.66, 0.06, 0.08)),
    "white": ((0.95, 0.95, 0.95), (0.87, 0.87, 0.89)),
    "yellow": ((0.95, 0.88, 0.16), (0.92, 0.84, 0.32)),
}
COLOR_JITTER = 0.03

FIRST_PART = 1 + len(OBJECTS)
FIRST_MATERIAL = FIRST_PART + len(PARTS)
FIRST_COLOR = FIRST_MATERIAL + len(MATERIALS)
FIRST_SCENE = FIRST_COLOR + len(COLORS)

CATEGORIES: tuple[str, ...] = ("object", "part", "material", "color")
IMAGE_CATEGORIES: tuple[str, ...] = ("scene",)


def concept_rows() -> list[tuple[int, str, str]]:
    """(id, name, category) for every concept, in id order."""
    groups = (
        ("object", OBJECTS),
        ("part", PARTS),
        ("material", MATERIALS),
        ("color", COLORS),
        ("scene", SCENES),
    )
    rows: list[tuple[int, str, str]] = []
    for category, names in groups:
        start = len(rows) + 1
        rows += [(start + i, name, category) for i, name in enumerate(names)]
    return rows


def object_id(name: str) -> int:
    """Global concept id of an object."""
    return 1 + OBJECTS.index(name)


def part_id(name: str) -> int:
    """Global concept id of a part."""
    return FIRST_PART + PARTS.index(name)


def material_id(name: str) -> int:
    """Global concept id of a material."""
    return FIRST_MATERIAL + MATERIALS.index(name)


def color_id(name: str) -> int:
    """Global concept id of a color term."""
    return FIRST_COLOR + COLORS.index(name)


def scene_id(name: str) -> int:
    """Global concept id of a scene."""
    return FIRST_SCENE + SCENES.index(name)
