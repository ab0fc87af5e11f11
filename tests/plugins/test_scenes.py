"""The scenes concept source: determinism, pixel-exact labels, concept table, plugin spec."""

import collections
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from nethook_plugins.scenes import Scenes
from nethook_plugins.scenes.canvas import Paint
from nethook_plugins.scenes.concepts import (
    PART_OWNERS,
    color_id,
    concept_rows,
    object_id,
    part_id,
)
from nethook_plugins.scenes.layout import SCENE_WEIGHTS, Layout, render
from nethook_plugins.scenes.objects import KINDS, sample_object
from nethook_plugins.scenes.rand import Rand
from torch.utils.data import DataLoader

from nethook.plugins import get_source

DOCS = Path(__file__).resolve().parents[2] / "docs" / "scenes.md"
BACKGROUND = (0.123, 0.456, 0.789)


def _same(a: dict, b: dict) -> bool:
    return (
        a["index"] == b["index"]
        and a["image"].numpy().tobytes() == b["image"].numpy().tobytes()
        and all(torch.equal(a["labels"][k], b["labels"][k]) for k in a["labels"])
        and all(torch.equal(a["image_labels"][k], b["image_labels"][k]) for k in a["image_labels"])
    )


def test_same_seed_and_index_give_identical_bytes_in_any_order():
    first = Scenes(n=20, size=48, seed=5, progress=False)
    second = Scenes(n=20, size=48, seed=5, progress=False)
    backwards = {i: second[i] for i in reversed(range(20))}
    assert all(_same(first[i], backwards[i]) for i in range(20))


def test_different_seeds_and_indices_differ():
    a = Scenes(n=5, size=48, seed=0, progress=False)
    b = Scenes(n=5, size=48, seed=1, progress=False)
    assert all(not torch.equal(a[i]["image"], b[i]["image"]) for i in range(5))
    assert not torch.equal(a[0]["image"], a[1]["image"])


def test_layout_and_scene_do_not_depend_on_image_size():
    small = Scenes(n=10, size=32, seed=3, progress=False)
    large = Scenes(n=10, size="64x96", seed=3, progress=False)
    for i in range(10):
        assert torch.equal(small[i]["image_labels"]["scene"], large[i]["image_labels"]["scene"])
    item = large[0]
    assert item["image"].shape == (3, 64, 96) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert all(v.shape == (1, 64, 96) and v.dtype == torch.int64 for v in item["labels"].values())
    assert Scenes(n=1, size=8, progress=False)[0]["image"].shape == (3, 8, 8)


def test_dataloader_with_two_workers_matches_single_process():
    source = Scenes(n=12, size=32, seed=7, progress=False)
    kwargs = {"batch_size": 4, "collate_fn": source.collate}
    single = list(DataLoader(source, **kwargs))
    multi = list(DataLoader(source, num_workers=2, **kwargs))
    for a, b in zip(single, multi, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["index"], b["index"])
        assert all(torch.equal(a["labels"][k], b["labels"][k]) for k in a["labels"])
        assert torch.equal(a["image_labels"]["scene"], b["image_labels"]["scene"])


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_object_label_is_exactly_where_the_object_was_drawn(kind):
    """One object on a flat background: labelled pixels == pixels that changed."""
    for k in range(3):
        inst = sample_object(Rand(11, k), kind, 0.8, 0.5, 1.6)
        layout = Layout("street", backgrounds=[("sky", (0, 0, 1, 1), Paint(BACKGROUND, "blue"))])
        layout.objects.append(inst)
        canvas = render(layout, 96, 96)
        image, labels = canvas.image(), canvas.labels()
        changed = np.abs(image - np.array(BACKGROUND, dtype=np.float32)[:, None, None]).max(0) > 0
        drawn = labels[0] == object_id(kind)
        assert drawn.sum() > 20, f"{kind} drew only {drawn.sum()} pixels"
        assert np.array_equal(changed, drawn)
        for part in np.unique(labels[1][labels[1] > 0]):
            name = list(PART_OWNERS)[part - part_id("roof")]
            assert kind in PART_OWNERS[name]


PART_ORDER = [  # (object, part drawn higher on average, part drawn lower)
    ("house", "roof", "wall"),
    ("house", "window", "door"),
    ("tree", "crown", "trunk"),
    ("person", "head", "body"),
    ("person", "body", "leg"),
    ("car", "window", "wheel"),
    ("cow", "body", "leg"),
    ("boat", "sail", "hull"),
    ("umbrella", "canopy", "pole"),
    ("table", "top", "leg"),
    ("chair", "back", "seat"),
    ("cabinet", "drawer", "door"),
]


@pytest.mark.parametrize("kind, upper, lower", PART_ORDER)
def test_parts_sit_where_they_belong(kind, upper, lower):
    inst = sample_object(Rand(2), kind, 0.9, 0.5, 1.8)
    layout = Layout("street", backgrounds=[("sky", (0, 0, 1, 1), Paint(BACKGROUND, "blue"))])
    layout.objects.append(inst)
    parts = render(layout, 128, 128).labels()[1]
    rows = np.arange(128)[:, None] * np.ones((1, 128))
    up, low = parts == part_id(upper), parts == part_id(lower)
    assert up.any() and low.any()
    assert rows[up].mean() < rows[low].mean()


def _paint_table(layout: Layout) -> dict[int, list[tuple[tuple[float, ...], str]]]:
    """object id -> every (rgb, color term) the layout may paint for that object."""
    table = collections.defaultdict(list)
    for name, _, paint in layout.backgrounds:
        table[object_id(name)] += [(paint.rgb, paint.color), (paint.rgb2, paint.color2)]
    for inst in layout.objects:
        for paint in inst.paints.values():
            table[object_id(inst.kind)] += [(paint.rgb, paint.color), (paint.rgb2, paint.color2)]
    return table


def test_every_labelled_pixel_shows_its_object_and_color():
    """Noise-free scenes: each pixel's RGB is a paint of the object it is labelled with,
    and its color label is that paint's color term; parts lie inside their owners."""
    source = Scenes(n=25, size=64, seed=4, noise=0.0, progress=False)
    part_names = list(PART_OWNERS)
    for i in range(len(source)):
        item, layout = source[i], source.layout(i)
        image = item["image"].numpy().reshape(3, -1).T
        obj = item["labels"]["object"][0].numpy().reshape(-1)
        color = item["labels"]["color"][0].numpy().reshape(-1)
        part = item["labels"]["part"][0].numpy().reshape(-1)
        assert (obj > 0).all(), "every pixel of a scene belongs to some object"
        for oid, paints in _paint_table(layout).items():
            pixels = obj == oid
            rgbs = np.array([p[0] for p in paints], dtype=np.float32)
            diff = np.abs(image[pixels][:, None, :] - rgbs[None]).max(-1)
            assert (diff.min(1) == 0).all(), f"sample {i}: object {oid} shows a foreign color"
            expected = np.array([color_id(p[1]) for p in paints])[diff.argmin(1)]
            assert np.array_equal(color[pixels], expected), f"sample {i}, object {oid}"
        for pid in np.unique(part[part > 0]):
            owners = {object_id(o) for o in PART_OWNERS[part_names[pid - part_id("roof")]]}
            assert set(np.unique(obj[part == pid])) <= owners


def test_concept_table_matches_labels_and_frequency():
    source = Scenes(n=30, size=32, seed=9, progress=False)
    table = source.concepts()
    assert table["name"].is_unique
    assert table["id"].tolist() == list(range(1, len(table) + 1))
    category_of = dict(zip(table["id"], table["category"], strict=True))
    seen = collections.Counter()
    for i in range(len(source)):
        item = source[i]
        ids = set()
        for cat, labels in {**item["labels"], **item["image_labels"]}.items():
            present = set(torch.unique(labels).tolist()) - {0}
            assert all(category_of[c] == cat for c in present), f"sample {i}, {cat}"
            ids |= present
        seen.update(ids)
    assert {c: int(f) for c, f in zip(table["id"], table["frequency"], strict=True) if f} == dict(
        seen
    )
    assert set(table["category"]) == {"object", "part", "material", "color", "scene"}


def test_scene_label_follows_the_objects_placed():
    source = Scenes(n=600, seed=0, progress=False)
    labels = collections.Counter()
    supported = collections.Counter()
    for i in range(len(source)):
        layout = source.layout(i)
        labels[layout.scene] += 1
        counts = layout.counts()
        supported[layout.scene] += any(counts.get(k, 0) for k in SCENE_WEIGHTS[layout.scene])
    assert set(labels) == set(SCENE_WEIGHTS)
    assert min(labels.values()) > 600 / len(labels) / 2
    for scene, n in labels.items():
        assert supported[scene] / n > 0.9, scene
    forest_only = Layout("forest")
    forest_only.objects = [sample_object(Rand(i), "tree", 0.8, 0.5, 1.0) for i in range(4)]
    assert forest_only.counts() == {"tree": 4}


def test_docs_concept_table_matches_the_code():
    rows = re.findall(r"^\|\s*(\d+)\s*\|\s*([^|]+?)\s*\|\s*(\w+)\s*\|", DOCS.read_text(), re.M)
    assert [(int(i), n, c) for i, n, c in rows] == concept_rows()


def test_spec_and_bad_input():
    direct = Scenes(n=5, size=32, seed=2)
    assert get_source("scenes:n=5,size=32,seed=2").fingerprint() == direct.fingerprint()
    assert direct.fingerprint() != Scenes(n=5, size=32, seed=3).fingerprint()
    with pytest.raises(ValueError, match="size"):
        Scenes(size="big")
    with pytest.raises(ValueError, match="n="):
        Scenes(n=-1)
    with pytest.raises(ValueError, match="seed"):
        Scenes(seed=-2)
    with pytest.raises(ValueError, match="colour"):
        get_source("scenes:colour=1")
    with pytest.raises(IndexError):
        direct[5]
