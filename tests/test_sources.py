"""The concept-source protocol: concept tables, collate, frequency tallies, SegmentedSource."""

import math

import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from nethook.sources import (
    ConceptSource,
    SegmentedSource,
    Segmenter,
    collate,
    concept_frame,
    tally_frequency,
)


def test_concept_frame_sorted_with_columns_and_nan_frequency():
    table = concept_frame([3, 1, 2], ["c", "a", "b"], ["x", "y", "y"])
    assert list(table.columns) == ["id", "name", "category", "frequency"]
    assert table["id"].tolist() == [1, 2, 3]
    assert table["name"].tolist() == ["a", "b", "c"]
    assert table["frequency"].isna().all()


@pytest.mark.parametrize(
    "ids, names, cats, match",
    [
        ([0, 1], ["none", "a"], ["x", "x"], "reserved"),
        ([1, 1], ["a", "b"], ["x", "x"], "duplicate ids"),
        ([1, 2], ["a"], ["x", "x"], "same length"),
    ],
)
def test_concept_frame_rejects_bad_tables(ids, names, cats, match):
    with pytest.raises(ValueError, match=match):
        concept_frame(ids, names, cats)


def _item(index, layers, h=4, w=5, scene=()):
    """An item whose 'part' labels have ``layers`` layers filled with 10*index + layer + 1."""
    labels = {"part": torch.stack([torch.full((h, w), 10 * index + k + 1) for k in range(layers)])}
    return {
        "image": torch.full((3, h, w), float(index)),
        "labels": labels,
        "image_labels": {"scene": torch.tensor(scene, dtype=torch.int64)},
        "index": index,
    }


def test_collate_pads_layers_and_image_labels_with_zero():
    batch = collate([_item(0, 1, scene=(7,)), _item(1, 3, scene=(8, 9)), _item(2, 2)])
    assert batch["image"].shape == (3, 3, 4, 5)
    assert batch["image"][2].eq(2.0).all()
    part = batch["labels"]["part"]
    assert part.shape == (3, 3, 4, 5) and part.dtype == torch.int64
    assert part[0, 0].eq(1).all() and part[0, 1:].eq(0).all()
    assert [part[1, k, 0, 0].item() for k in range(3)] == [11, 12, 13]
    assert part[2, 2].eq(0).all() and part[2, 1].eq(22).all()
    assert batch["image_labels"]["scene"].tolist() == [[7, 0], [8, 9], [0, 0]]
    assert batch["index"].tolist() == [0, 1, 2]


def test_collate_zero_fills_a_category_missing_from_some_items():
    a, b = _item(0, 1), _item(1, 2)
    b["labels"]["color"] = torch.full((1, 4, 5), 4)
    del a["image_labels"]
    batch = collate([a, b])
    assert batch["labels"]["color"][0].eq(0).all() and batch["labels"]["color"][1].eq(4).all()
    assert batch["image_labels"]["scene"].shape == (2, 1)


def test_collate_rejects_mismatched_sizes_naming_what():
    with pytest.raises(ValueError, match="images"):
        collate([_item(0, 1, h=4), _item(1, 1, h=6)])
    odd = _item(1, 1, h=6)
    odd["image"] = torch.zeros(3, 4, 5)
    with pytest.raises(ValueError, match="labels\\['part'\\]"):
        collate([_item(0, 1, h=4), odd])


class RedSegmenter(Segmenter):
    """Labels pixels with red > 0.5 as concept 1 ("red"), others as 2 ("dark")."""

    categories = ("color",)

    def concepts(self):
        return concept_frame([1, 2], ["red", "dark"], ["color", "color"])

    def segment(self, images):
        return {"color": torch.where(images[:, :1] > 0.5, 1, 2).long()}


def _half_red_images(n, h=6, w=8):
    """Image i has its first i columns (mod w) red, the rest black."""
    images = torch.zeros(n, 3, h, w)
    for i in range(n):
        images[i, 0, :, : i % w] = 1.0
    return images


def test_segmented_source_labels_match_construction_and_batch():
    images = _half_red_images(5)
    source = SegmentedSource(images, RedSegmenter(), progress=False)
    assert len(source) == 5 and source.categories == ("color",)
    item = source[3]
    assert item["index"] == 3 and torch.equal(item["image"], images[3])
    expected = torch.full((1, 6, 8), 2)
    expected[:, :, :3] = 1
    assert torch.equal(item["labels"]["color"], expected)
    loader = DataLoader(source, batch_size=2, collate_fn=source.collate)
    batches = list(loader)
    assert batches[0]["labels"]["color"].shape == (2, 1, 6, 8)
    assert batches[-1]["index"].tolist() == [4]


def test_segmented_source_frequency_counts_images_with_each_concept():
    source = SegmentedSource(_half_red_images(5), RedSegmenter(), progress=False)
    table = source.concepts()
    # image 0 has no red column; every image has some dark pixels
    assert dict(zip(table["name"], table["frequency"], strict=True)) == {"red": 4.0, "dark": 5.0}


class _Tuples(Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], i


def test_segmented_source_accepts_tuple_and_dict_items_and_rejects_bad_ones():
    images = _half_red_images(3)
    source = SegmentedSource(_Tuples(images), RedSegmenter(), progress=False)
    assert torch.equal(source[2]["image"], images[2])
    dicts = [{"image": im} for im in images]
    assert torch.equal(SegmentedSource(dicts, RedSegmenter())[1]["image"], images[1])
    with pytest.raises(ValueError, match="item 0"):
        SegmentedSource(torch.zeros(2, 1, 4, 4), RedSegmenter())[0]
    with pytest.raises(IndexError):
        SegmentedSource(images, RedSegmenter())[3]


def test_fingerprint_is_stable_and_follows_content():
    images = _half_red_images(4)
    a = SegmentedSource(images, RedSegmenter()).fingerprint()
    assert a == SegmentedSource(images.clone(), RedSegmenter()).fingerprint()
    changed = images.clone()
    changed[0, 1, 0, 0] = 0.5
    assert a != SegmentedSource(changed, RedSegmenter()).fingerprint()


class _Counting(ConceptSource):
    """Item i labels concept (i % 3) + 1 on one pixel, and whole-image concept 9."""

    categories = ("object",)
    image_categories = ("scene",)

    def __len__(self):
        return 7

    def __getitem__(self, i):
        labels = torch.zeros(1, 2, 2, dtype=torch.int64)
        labels[0, 0, 0] = i % 3 + 1
        return {
            "image": torch.zeros(3, 2, 2),
            "labels": {"object": labels},
            "image_labels": {"scene": torch.tensor([9])},
            "index": i,
        }


def test_tally_frequency_counts_dense_and_image_labels():
    counts = tally_frequency(_Counting(), 10, progress=False)
    assert counts.tolist() == [0, 3, 2, 2, 0, 0, 0, 0, 0, 7]
    assert tally_frequency(_Counting(), 10, limit=2, progress=False)[1:4].tolist() == [1, 1, 0]


def test_base_class_defaults():
    source = _Counting()
    mean, std = source.normalization
    assert len(mean) == 3 and all(s > 0 for s in std)
    assert source.collate is collate
    with pytest.raises(NotImplementedError):
        source.concepts()
    assert isinstance(concept_frame([1], ["a"], ["object"]), pd.DataFrame)
    assert math.isnan(concept_frame([1], ["a"], ["object"])["frequency"][0])
