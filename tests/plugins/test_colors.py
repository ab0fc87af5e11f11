"""The colors segmenter: basic color terms on known colors, CIELAB, and as a concept source."""

import pytest
import torch
from nethook_plugins.colors import COLOR_TERMS, ColorSegmenter, rgb_to_lab
from nethook_plugins.scenes import Scenes
from nethook_plugins.scenes.concepts import color_id

from nethook.plugins import get_segmenter
from nethook.sources import SegmentedSource

KNOWN = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 0.5, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "orange": (1.0, 0.55, 0.0),
    "purple": (0.5, 0.0, 0.5),
    "pink": (1.0, 0.75, 0.8),
    "brown": (0.55, 0.27, 0.07),
    "black": (0.0, 0.0, 0.0),
    "white": (1.0, 1.0, 1.0),
    "grey": (0.5, 0.5, 0.5),
    # a few less canonical ones
    "navy": (0.0, 0.0, 0.5),
    "sky": (0.53, 0.81, 0.92),
    "lime": (0.2, 0.8, 0.2),
    "maroon": (0.5, 0.0, 0.0),
    "silver": (0.75, 0.75, 0.75),
    "charcoal": (0.1, 0.1, 0.1),
    "gold": (1.0, 0.84, 0.0),
}
EXPECTED = {
    "navy": "blue",
    "sky": "blue",
    "lime": "green",
    "maroon": "red",
    "silver": "grey",
    "charcoal": "black",
    "gold": "yellow",
}


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_known_colors_get_their_term(name):
    seg = ColorSegmenter()
    image = torch.tensor(KNOWN[name]).view(1, 3, 1, 1).expand(1, 3, 2, 3)
    ids = seg.segment(image)["color"]
    assert ids.shape == (1, 1, 2, 3) and ids.dtype == torch.int64
    term = EXPECTED.get(name, name)
    assert ids.eq(COLOR_TERMS.index(term) + 1).all()


def test_rgb_to_lab_reference_values():
    rgb = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    lab = rgb_to_lab(rgb.double())
    # standard sRGB (D65) values: white, black, red, blue
    expected = torch.tensor(
        [[100.0, 0.0, 0.0], [0.0, 0.0, 0.0], [53.24, 80.09, 67.20], [32.30, 79.19, -107.86]],
        dtype=torch.float64,
    )
    assert torch.allclose(lab, expected, atol=0.02)


def test_concept_table_and_spec():
    seg = get_segmenter("colors")
    table = seg.concepts()
    assert table["name"].tolist() == list(COLOR_TERMS) and len(table) == 11
    assert table["id"].tolist() == list(range(1, 12))
    assert set(table["category"]) == {"color"} and seg.categories == ("color",)
    assert seg.fingerprint() == ColorSegmenter().fingerprint()
    with pytest.raises(ValueError, match="images"):
        seg.segment(torch.zeros(1, 4, 2, 2))


def test_large_images_are_processed_in_chunks_with_the_same_result():
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    whole = ColorSegmenter().segment(image)["color"]
    chunked = ColorSegmenter(chunk=7).segment(image)["color"]
    assert torch.equal(whole, chunked)


def test_segmented_source_of_two_color_images():
    images = torch.zeros(2, 3, 4, 6)
    images[:, 0, :, :3] = 1.0  # left half red
    images[1, 2, :, 3:] = 1.0  # image 1: right half blue (image 0: black)
    source = SegmentedSource(images, get_segmenter("colors"), progress=False)
    red, blue, black = (COLOR_TERMS.index(t) + 1 for t in ("red", "blue", "black"))
    labels = source[1]["labels"]["color"][0]
    assert labels[:, :3].eq(red).all() and labels[:, 3:].eq(blue).all()
    assert source[0]["labels"]["color"][0, :, 3:].eq(black).all()
    frequency = dict(zip(source.concepts()["name"], source.concepts()["frequency"], strict=True))
    assert frequency["red"] == 2 and frequency["blue"] == 1 and frequency["black"] == 1
    assert frequency["green"] == 0


def test_agrees_with_scenes_color_labels():
    """The scenes palette is drawn inside each term: the segmenter should name it back."""
    source = Scenes(n=8, size=48, seed=1, progress=False)
    seg = ColorSegmenter()
    to_scene_id = torch.tensor([0] + [color_id(t) for t in COLOR_TERMS])
    agree = []
    for i in range(len(source)):
        item = source[i]
        named = to_scene_id[seg.segment(item["image"][None])["color"][0]]
        agree.append((named == item["labels"]["color"]).float().mean().item())
    assert min(agree) > 0.97 and sum(agree) / len(agree) > 0.99
