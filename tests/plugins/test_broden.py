"""The Broden reader on a small directory written in the distributed layout."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from nethook_plugins.broden import BrodenFormatError, BrodenSource
from PIL import Image
from torch.utils.data import DataLoader

from nethook.plugins import get_source
from tests.plugins.broden_fixture import (
    CATEGORIES,
    DOOR,
    NAMES,
    WALL,
    WINDOW,
    fixture_images,
    make_broden,
)

N, SIZE, SEG = 6, 32, 16


@pytest.fixture(scope="module")
def broden(tmp_path_factory) -> Path:
    return make_broden(tmp_path_factory.mktemp("broden"), n_images=N, size=SIZE, seg_size=SEG)


@pytest.fixture(scope="module")
def truth():
    return fixture_images(N, SIZE, SEG)


def _rewrite(path: Path, edit) -> None:
    """Apply ``edit(rows)`` to a CSV file's rows (header included)."""
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    edit(rows)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_dense_labels_decode_to_the_written_label_numbers(broden, truth):
    source = BrodenSource(broden)
    assert source.categories == ("color", "object", "part", "material")
    assert len(source) == N
    for i, expected in enumerate(truth):
        item = source[i]
        assert item["index"] == i
        for cat in source.categories:
            got = item["labels"][cat]
            assert got.dtype == torch.int64
            if cat in expected.dense:
                want = np.stack(expected.dense[cat])
            elif cat in expected.numbers:  # a whole-image number in a per-pixel column
                want = np.stack([np.full((SEG, SEG), n) for n in expected.numbers[cat]])
            else:
                want = np.zeros((1, SEG, SEG))
            np.testing.assert_array_equal(got.numpy(), want, err_msg=f"image {i} {cat}")


def test_labels_above_255_use_the_green_channel(broden):
    cars = BrodenSource(broden)[0]["labels"]["object"]
    assert (cars == 300).any()  # R=44, G=1


def test_image_is_the_written_picture_at_its_own_size(broden, truth):
    source = BrodenSource(broden)
    for i, expected in enumerate(truth):
        image = source[i]["image"]
        assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
        want = torch.from_numpy(expected.image).permute(2, 0, 1).float() / 255
        assert (image - want).abs().mean() < 0.03  # JPEG, so not bit-exact


def test_parts_keep_one_layer_per_file_so_a_pixel_can_have_two_parts(broden):
    part = BrodenSource(broden)[0]["labels"]["part"]
    assert part.shape == (2, SEG, SEG)
    both = (part[0] == WINDOW) & (part[1] == DOOR)
    assert both.any()
    assert not (part[0] == DOOR).any()


def test_scene_and_texture_are_whole_image_labels(broden, truth):
    source = BrodenSource(broden)
    assert source.image_categories == ("scene", "texture")
    for i, expected in enumerate(truth):
        labels = source[i]["image_labels"]
        for cat in ("scene", "texture"):
            want = expected.numbers.get(cat) or [0]
            assert labels[cat].tolist() == want, (i, cat)
    assert source[3]["image_labels"]["scene"].tolist() == [800, 801]


def test_dataloader_with_workers_batches_and_pads(broden):
    source = BrodenSource(broden)
    loader = DataLoader(source, batch_size=3, num_workers=2, collate_fn=source.collate)
    batches = list(loader)
    assert [b["index"].tolist() for b in batches] == [[0, 1, 2], [3, 4, 5]]
    first = batches[0]
    assert first["image"].shape == (3, 3, SIZE, SIZE)
    assert first["labels"]["part"].shape == (3, 2, SEG, SEG)
    assert first["image_labels"]["texture"].tolist() == [[0], [0], [900]]
    np.testing.assert_array_equal(first["labels"]["object"][0], source[0]["labels"]["object"])


def test_concept_table_uses_global_numbers_and_primary_category(broden, truth):
    table = BrodenSource(broden).concepts()
    assert list(table.columns[:4]) == ["id", "name", "category", "frequency"]
    assert dict(zip(table["id"], table["name"], strict=True)) == {n: NAMES[n] for n in table["id"]}
    wall = table.set_index("id").loc[WALL]
    assert wall["category"] == "object"  # 2 images as an object, 1 as a part
    assert set(wall["categories"].split(";")) == {"object", "part"}
    for number, frequency in zip(table["id"], table["frequency"], strict=True):
        images = sum(
            any(number in np.unique(layer) for layers in t.dense.values() for layer in layers)
            or any(number in nums for nums in t.numbers.values())
            for t in truth
        )
        assert frequency == images, NAMES[number]


def test_category_tables(broden):
    source = BrodenSource(broden)
    categories = source.category_table()
    assert list(categories["name"]) == list(CATEGORIES)
    assert categories.set_index("name").loc["part", "count"] == 4
    parts = source.category_codes("part")
    assert list(parts["code"]) == [1, 2, 3, 4]
    assert list(parts["number"]) == [WALL, 520, WINDOW, DOOR]
    assert list(parts["name"]) == ["wall", "wheel", "window", "door"]
    with pytest.raises(ValueError, match="no category 'hat'"):
        source.category_codes("hat")


def test_split_limit_and_category_selection(broden, truth):
    val = BrodenSource(broden, split="val")
    assert [val.image_path(i).name for i in range(len(val))] == [
        Path(t.name).name for t in truth if t.split == "val"
    ]
    assert len(BrodenSource(broden, split="train", limit=2)) == 2
    some = BrodenSource(broden, categories="object;scene")
    assert some.categories == ("object",) and some.image_categories == ("scene",)
    item = some[0]
    assert set(item["labels"]) == {"object"} and set(item["image_labels"]) == {"scene"}
    assert set(some.concepts()["category"]) == {"object", "scene"}
    with pytest.raises(ValueError, match="splits present: train, val"):
        BrodenSource(broden, split="test")
    with pytest.raises(ValueError, match="no category hat"):
        BrodenSource(broden, categories=["hat"])


def test_columns_are_read_by_header_not_position(tmp_path, broden):
    shuffled = make_broden(tmp_path, n_images=N, size=SIZE, seg_size=SEG, columns=CATEGORIES[::-1])
    a, b = BrodenSource(broden), BrodenSource(shuffled)
    for i in range(N):
        for cat in a.categories:
            assert torch.equal(a[i]["labels"][cat], b[i]["labels"][cat])


def test_spec_through_the_plugin_registry(broden):
    source = get_source(f"broden:{broden},split=train,limit=3")
    assert isinstance(source, BrodenSource)
    assert source.split == "train" and len(source) == 3
    with pytest.raises(ValueError, match="unknown option.*colour"):
        get_source(f"broden:{broden},colour=red")


def test_fingerprint_follows_content_and_parameters(tmp_path, broden):
    copy = make_broden(tmp_path, n_images=N, size=SIZE, seg_size=SEG)
    assert BrodenSource(copy).fingerprint() == BrodenSource(broden).fingerprint()
    assert BrodenSource(copy, split="val").fingerprint() != BrodenSource(copy).fingerprint()
    _rewrite(copy / "label.csv", lambda rows: rows[1].__setitem__(1, "gray-c"))
    assert BrodenSource(copy).fingerprint() != BrodenSource(broden).fingerprint()


@pytest.mark.parametrize("name", ["index.csv", "label.csv", "category.csv", "c_part.csv"])
def test_missing_metadata_file_is_named(tmp_path, name):
    root = make_broden(tmp_path, n_images=3)
    (root / name).unlink()
    with pytest.raises(BrodenFormatError, match=rf"{name}: missing"):
        BrodenSource(root)


def test_malformed_index_row_names_file_and_line(tmp_path):
    root = make_broden(tmp_path, n_images=3)
    _rewrite(root / "index.csv", lambda rows: rows[2].__setitem__(2, "big"))
    with pytest.raises(BrodenFormatError, match=r"index\.csv:3: column 'ih' is 'big'"):
        BrodenSource(root)


def test_short_row_and_unknown_label_name_the_line(tmp_path):
    root = make_broden(tmp_path, n_images=3)
    _rewrite(root / "index.csv", lambda rows: rows[3].pop())
    with pytest.raises(BrodenFormatError, match=r"index\.csv:4: row has 11 fields, expected 12"):
        BrodenSource(root)
    root = make_broden(tmp_path / "b", n_images=3)
    _rewrite(root / "index.csv", lambda rows: rows[1].__setitem__(10, "800;999"))
    with pytest.raises(BrodenFormatError, match=r"index\.csv:2: scene label 999 is not in label"):
        BrodenSource(root)


def test_malformed_label_category_names_file_and_line(tmp_path):
    root = make_broden(tmp_path, n_images=3)
    _rewrite(root / "label.csv", lambda rows: rows[4].__setitem__(2, "color"))
    with pytest.raises(BrodenFormatError, match=r"label\.csv:5: category 'color' is malformed"):
        BrodenSource(root)


def test_image_size_disagreeing_with_index_names_the_image(tmp_path):
    root = make_broden(tmp_path, n_images=3)
    image = root / "images" / "fixture" / "im_0001.jpg"
    Image.new("RGB", (SIZE, SIZE + 2)).save(image)
    source = BrodenSource(root)
    source[0]
    with pytest.raises(BrodenFormatError, match=r"im_0001\.jpg: image is 34x32.*line 3"):
        source[1]


def test_segmentation_size_and_missing_files_are_named(tmp_path):
    root = make_broden(tmp_path, n_images=3)
    Image.new("RGB", (SEG // 2, SEG // 2)).save(root / "images/fixture/im_0000_object.png")
    (root / "images/fixture/im_0001_color.png").unlink()
    (root / "images/fixture/im_0002.jpg").unlink()
    source = BrodenSource(root)
    with pytest.raises(BrodenFormatError, match=r"im_0000_object\.png: segmentation is 8x8"):
        source[0]
    with pytest.raises(BrodenFormatError, match=r"im_0001_color\.png: color segmentation missing"):
        source[1]
    with pytest.raises(BrodenFormatError, match=r"im_0002\.jpg: image missing.*line 4"):
        source[2]
