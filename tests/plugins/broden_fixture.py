"""Build a small Broden directory, in exactly the distributed layout, with known labels.

``make_broden(tmpdir)`` writes index.csv, label.csv, category.csv, c_<category>.csv
and images/ (JPEG images, segmentation PNGs with label = R + 256*G) and returns the
directory. ``fixture_images(...)`` returns the same images and label maps as plain
arrays (the ground truth the files were written from), so tests can check a reader
against values it did not compute. Everything is deterministic for a seed.

Three kinds of image cycle: a street (a red car with metal material, window and
wheel parts plus a door in a second part layer, a wall; scene street-s, sometimes
also forest-s), a forest (a tree whose trunk is wood; scene forest-s) and a
texture swatch (stripes; texture striped and sometimes dotted; no objects;
material given as a whole-image number). Label numbers above 255 exercise the
green channel. Pixel colours match the colour labels, so "red-c" pixels are red.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

CATEGORIES = ("color", "object", "part", "material", "scene", "texture")

# number -> (name, RGB colour for colour labels)
COLORS = {
    1: ("grey-c", (128, 128, 128)),
    2: ("red-c", (220, 20, 20)),
    3: ("green-c", (20, 160, 20)),
    4: ("blue-c", (30, 60, 220)),
    5: ("brown-c", (120, 70, 20)),
}
NAMES = {number: name for number, (name, _) in COLORS.items()}
NAMES.update(
    {
        300: "car",
        301: "tree",
        302: "wall",  # an object and a part: label.csv lists both categories
        520: "wheel",
        521: "window",
        522: "door",
        700: "wood",
        701: "metal",
        800: "street-s",
        801: "forest-s",
        900: "striped",
        901: "dotted",
    }
)
CAR, TREE, WALL, WHEEL, WINDOW, DOOR, WOOD, METAL = 300, 301, 302, 520, 521, 522, 700, 701
STREET, FOREST, STRIPED, DOTTED = 800, 801, 900, 901
GREY, RED, GREEN, BLUE, BROWN = 1, 2, 3, 4, 5


@dataclass
class FixtureImage:
    """Ground truth of one fixture image (before it is encoded to files)."""

    name: str
    """Path of the JPEG relative to images/."""
    split: str
    image: np.ndarray
    """uint8 ``[size, size, 3]``."""
    dense: dict[str, list[np.ndarray]] = field(default_factory=dict)
    """Per-pixel category -> layers (int64 ``[seg, seg]``), one PNG each."""
    numbers: dict[str, list[int]] = field(default_factory=dict)
    """Category -> label numbers written as numbers in index.csv (whole image)."""


def _street(rng: np.random.Generator, s: int, two_scenes: bool) -> tuple[dict, dict]:
    color = np.full((s, s), BLUE, dtype=np.int64)
    color[s // 2 :] = GREY
    obj = np.zeros((s, s), dtype=np.int64)
    obj[: max(1, s // 8)] = WALL
    h, w = s // 4 + 1, s // 3 + 1
    r0 = int(rng.integers(s // 4, s - h))
    c0 = int(rng.integers(0, s - w))
    car = (slice(r0, r0 + h), slice(c0, c0 + w))
    color[car] = RED
    obj[car] = CAR
    part1 = np.zeros((s, s), dtype=np.int64)
    part1[r0 : r0 + h // 2, c0 : c0 + w] = WINDOW
    part1[r0 + h - 1, c0 : c0 + w] = WHEEL
    part2 = np.zeros((s, s), dtype=np.int64)
    part2[r0 : r0 + h, c0 : c0 + w // 2] = DOOR  # overlaps the window in layer 1
    if two_scenes:
        part2[0, :] = WALL  # the wall as a part too, in fewer images than as an object
    material = np.zeros((s, s), dtype=np.int64)
    material[car] = METAL
    dense = {"color": [color], "object": [obj], "part": [part1, part2], "material": [material]}
    numbers = {"scene": [STREET, FOREST] if two_scenes else [STREET]}
    return dense, numbers


def _forest(rng: np.random.Generator, s: int) -> tuple[dict, dict]:
    color = np.full((s, s), BLUE, dtype=np.int64)
    obj = np.zeros((s, s), dtype=np.int64)
    material = np.zeros((s, s), dtype=np.int64)
    c0 = int(rng.integers(0, s // 2))
    w = s // 2
    crown = (slice(1, s // 2), slice(c0, c0 + w))
    trunk = (slice(s // 2, s), slice(c0 + w // 2 - 1, c0 + w // 2 + 1))
    for region, colour in ((crown, GREEN), (trunk, BROWN)):
        color[region] = colour
        obj[region] = TREE
    material[trunk] = WOOD
    dense = {"color": [color], "object": [obj], "material": [material]}
    return dense, {"scene": [FOREST]}


def _texture(s: int, dotted: bool) -> tuple[dict, dict]:
    color = np.full((s, s), RED, dtype=np.int64)
    color[::2] = BLUE
    numbers = {"texture": [STRIPED, DOTTED] if dotted else [STRIPED], "material": [WOOD]}
    return {"color": [color]}, numbers


def fixture_images(
    n_images: int = 6, size: int = 32, seg_size: int = 16, seed: int = 0
) -> list[FixtureImage]:
    """The ground truth that :func:`make_broden` writes (same arguments, same result)."""
    if size % seg_size or seg_size < 8:
        raise ValueError(f"size {size} must be a multiple of seg_size {seg_size} >= 8")
    rng = np.random.default_rng(seed)
    palette = np.zeros((max(COLORS) + 1, 3), dtype=np.uint8)
    for number, (_, rgb) in COLORS.items():
        palette[number] = rgb
    images = []
    for i in range(n_images):
        kind = i % 3
        if kind == 0:
            dense, numbers = _street(rng, seg_size, two_scenes=i % 2 == 1)
        elif kind == 1:
            dense, numbers = _forest(rng, seg_size)
        else:
            dense, numbers = _texture(seg_size, dotted=i % 2 == 1)
        scale = size // seg_size
        pixels = palette[dense["color"][0]].repeat(scale, axis=0).repeat(scale, axis=1)
        split = "val" if i % 4 == 3 else "train"
        images.append(FixtureImage(f"fixture/im_{i:04d}.jpg", split, pixels, dense, numbers))
    return images


def _encode(labels: np.ndarray) -> Image.Image:
    """Label numbers -> RGB PNG image with R = label % 256, G = label // 256."""
    rgb = np.zeros((*labels.shape, 3), dtype=np.uint8)
    rgb[..., 0] = labels % 256
    rgb[..., 1] = labels // 256
    return Image.fromarray(rgb, mode="RGB")


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def make_broden(
    tmpdir: str | Path,
    n_images: int = 6,
    size: int = 32,
    seg_size: int = 16,
    seed: int = 0,
    columns: tuple[str, ...] = CATEGORIES,
    name: str = "broden1_32",
) -> Path:
    """Write a Broden directory under ``tmpdir`` and return its path.

    ``columns`` orders the category columns of index.csv (readers must go by the
    header). The content equals ``fixture_images(n_images, size, seg_size, seed)``.
    """
    root = Path(tmpdir) / name
    (root / "images" / "fixture").mkdir(parents=True, exist_ok=True)
    images = fixture_images(n_images, size, seg_size, seed)
    # per label: category -> number of images where it appears in that category
    counts: dict[int, dict[str, int]] = {}
    seen: dict[int, set[int]] = {}  # label -> images where it appears at all
    index_rows = []
    for i, item in enumerate(images):
        stem = item.name[: -len(".jpg")]
        Image.fromarray(item.image).save(root / "images" / item.name, quality=95, subsampling=0)
        cells = {}
        for cat in columns:
            files = []
            for k, layer in enumerate(item.dense.get(cat, [])):
                suffix = f"{cat}_{k + 1}" if len(item.dense[cat]) > 1 else cat
                file = f"{stem}_{suffix}.png"
                _encode(layer).save(root / "images" / file)
                files.append(file)
            present = {int(v) for layer in item.dense.get(cat, []) for v in np.unique(layer)}
            present |= set(item.numbers.get(cat, []))
            for number in present - {0}:
                counts.setdefault(number, {}).setdefault(cat, 0)
                counts[number][cat] += 1
                seen.setdefault(number, set()).add(i)
            cells[cat] = ";".join(files + [str(n) for n in item.numbers.get(cat, [])])
        index_rows.append(
            [item.name, item.split, size, size, seg_size, seg_size] + [cells[c] for c in columns]
        )
    _write_csv(root / "index.csv", ["image", "split", "ih", "iw", "sh", "sw", *columns], index_rows)
    label_rows = []
    for number in sorted(counts):
        ranked = sorted(counts[number].items(), key=lambda kv: kv[1])  # most frequent last
        cats = ";".join(f"{c}({n})" for c, n in ranked)
        label_rows.append([number, NAMES[number], cats, len(seen[number]), "0.5", ""])
    _write_csv(
        root / "label.csv",
        ["number", "name", "category", "frequency", "coverage", "syns"],
        label_rows,
    )
    category_rows = []
    for cat in columns:
        numbers = sorted(n for n in counts if cat in counts[n])
        _write_csv(
            root / f"c_{cat}.csv",
            ["code", "number", "name", "frequency", "coverage"],
            [[code, n, NAMES[n], counts[n][cat], "0.5"] for code, n in enumerate(numbers, 1)],
        )
        frequency = sum(counts[n][cat] for n in numbers)
        first, last = (numbers[0], numbers[-1]) if numbers else ("", "")
        category_rows.append([cat, first, last, len(numbers), frequency])
    _write_csv(
        root / "category.csv", ["name", "first", "last", "count", "frequency"], category_rows
    )
    return root
