"""The segmenter adapter: part expansion, wrapping a model, the plugin spec."""

import json

import pytest
import torch
from nethook_plugins.segmenter import ModelSegmenter, expand_parts, read_labels
from torch import nn

from nethook.plugins import get_segmenter
from nethook.sources import SegmentedSource

T, B, L, R = 1, 2, 3, 4  # part codes of class 1; class c adds 4 * (c - 1)


def test_expand_parts_uses_each_components_bounding_box():
    classes = torch.zeros(2, 12, 12, dtype=torch.int64)
    classes[0, 1:5, 2:8] = 1  # rows 1-4, cols 2-7: halves at row 3 and col 5
    classes[0, 7:10, 0:3] = 1  # odd 3x3: the middle row/column goes bottom/right
    classes[0, 7:11, 6:11] = 2  # class 2: rows 7-10, cols 6-10
    # image 1: an L of class 1; halves come from its box (rows/cols 0-5), not its mass
    classes[1, 0:6, 0] = 1
    classes[1, 5, 0:6] = 1

    expected = torch.zeros(2, 2, 12, 12, dtype=torch.int64)
    expected[0, 0, 1:3, 2:8], expected[0, 0, 3:5, 2:8] = T, B
    expected[0, 1, 1:5, 2:5], expected[0, 1, 1:5, 5:8] = L, R
    expected[0, 0, 7, 0:3], expected[0, 0, 8:10, 0:3] = T, B
    expected[0, 1, 7:10, 0], expected[0, 1, 7:10, 1:3] = L, R
    expected[0, 0, 7:9, 6:11], expected[0, 0, 9:11, 6:11] = T + 4, B + 4
    expected[0, 1, 7:11, 6:8], expected[0, 1, 7:11, 8:11] = L + 4, R + 4
    expected[1, 0, 0:3, 0], expected[1, 0, 3:6, 0] = T, B
    expected[1, 0, 5, 1:6] = B
    expected[1, 1, 0:6, 0], expected[1, 1, 5, 1:3], expected[1, 1, 5, 3:6] = L, L, R

    assert torch.equal(expand_parts(classes, 3), expected)


def test_expand_parts_rejects_wrong_shape():
    with pytest.raises(ValueError, match="B, H, W"):
        expand_parts(torch.zeros(1, 1, 4, 4, dtype=torch.int64), 2)


def _color_model() -> nn.Module:
    """Class scores: background 0.5 everywhere, class 1 = red channel, class 2 = blue."""
    model = nn.Conv2d(3, 3, 1)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([0.5, 0.0, 0.0]))
        model.weight[1, 0] = 1.0
        model.weight[2, 2] = 1.0
    return model


LABELS = ["background", "red thing", "blue thing"]


def _image() -> torch.Tensor:
    image = torch.zeros(1, 3, 8, 8)
    image[0, 0, 0:4, 0:4] = 1.0  # red square, top-left
    image[0, 2, 4:8, 2:8] = 1.0  # blue block, bottom
    return image


def test_model_segmenter_labels_objects_and_parts():
    seg = ModelSegmenter(_color_model(), LABELS, parts=True, normalization=None)
    table = seg.concepts()
    names = dict(zip(table["id"], table["name"], strict=True))
    assert names[1] == "red thing" and names[2] == "blue thing"
    assert [names[i] for i in range(3, 11)] == [
        f"{c}-{s}" for c in ("red thing", "blue thing") for s in "tblr"
    ]
    assert seg.categories == ("object", "part")
    out = seg.segment(_image())
    obj, part = out["object"], out["part"]
    expected = torch.zeros(1, 1, 8, 8, dtype=torch.int64)
    expected[0, 0, 0:4, 0:4] = 1
    expected[0, 0, 4:8, 2:8] = 2
    assert torch.equal(obj, expected)
    assert part.shape == (1, 2, 8, 8)
    ids = {name: i for i, name in names.items()}
    assert part[0, 0, 0:2, 0:4].eq(ids["red thing-t"]).all()
    assert part[0, 0, 2:4, 0:4].eq(ids["red thing-b"]).all()
    assert part[0, 1, 0:4, 0:2].eq(ids["red thing-l"]).all()
    assert part[0, 1, 4:8, 5:8].eq(ids["blue thing-r"]).all()
    assert part[0, :, 4:8, 0:2].eq(0).all() and part[0, :, 0:4, 4:8].eq(0).all()


class _HalfResDict(nn.Module):
    """Returns {"out": scores} at half resolution, like torchvision's segmentation nets."""

    def __init__(self):
        super().__init__()
        self.head = _color_model()

    def forward(self, x):
        return {"out": self.head(nn.functional.avg_pool2d(x, 2)), "aux": None}


def test_dict_output_at_lower_resolution_is_resized():
    seg = ModelSegmenter(_HalfResDict(), LABELS, normalization=None)
    obj = seg.segment(_image())["object"]
    assert obj.shape == (1, 1, 8, 8)
    assert obj[0, 0, 1, 1] == 1 and obj[0, 0, 6, 5] == 2 and obj[0, 0, 1, 6] == 0
    assert "part" not in seg.segment(_image())


def test_normalization_is_applied_before_the_model():
    seen = []

    def model(x):
        seen.append(x)
        return torch.zeros(x.shape[0], 2, *x.shape[2:])

    ModelSegmenter(model, ["background", "a"], normalization=((0.5,) * 3, (0.25,) * 3)).segment(
        torch.ones(1, 3, 2, 2)
    )
    assert torch.allclose(seen[0], torch.full((1, 3, 2, 2), 2.0))


def test_wrong_output_shape_is_an_error_naming_the_labels():
    seg = ModelSegmenter(lambda x: torch.zeros(1, 5, 8, 8), LABELS, normalization=None)
    with pytest.raises(ValueError, match="3 labels"):
        seg.segment(_image())


def test_read_labels_formats(tmp_path):
    (tmp_path / "a.txt").write_text("background\ncat\n\ndog\n")
    (tmp_path / "b.json").write_text(json.dumps({"1": "cat", "0": "background"}))
    (tmp_path / "c.json").write_text("{not json")
    assert read_labels(tmp_path / "a.txt") == ["background", "cat", "dog"]
    assert read_labels(tmp_path / "b.json") == ["background", "cat"]
    with pytest.raises(ValueError, match="c.json"):
        read_labels(tmp_path / "c.json")
    with pytest.raises(ValueError, match="missing.txt"):
        read_labels(tmp_path / "missing.txt")


def test_spec_loads_model_weights_and_labels_from_files(tmp_path):
    (tmp_path / "segnet.py").write_text(
        "import torch\n\ndef build():\n    return torch.nn.Conv2d(3, 3, 1)\n"
    )
    torch.save(_color_model().state_dict(), tmp_path / "w.pt")
    (tmp_path / "labels.txt").write_text("\n".join(LABELS))
    spec = (
        f"segmenter:model={tmp_path}/segnet.py:build,weights={tmp_path}/w.pt,"
        f"labels={tmp_path}/labels.txt,parts=1,normalize=none"
    )
    seg = get_segmenter(spec)
    direct = ModelSegmenter(_color_model(), LABELS, parts=True, normalization=None)
    image = _image()
    assert all(
        torch.equal(seg.segment(image)[k], direct.segment(image)[k]) for k in ("object", "part")
    )
    source = SegmentedSource(image, seg, progress=False)
    freq = dict(zip(source.concepts()["name"], source.concepts()["frequency"], strict=True))
    assert freq["red thing"] == 1 and freq["blue thing-l"] == 1
    other = tmp_path / "w2.pt"
    torch.save(nn.Conv2d(3, 3, 1).state_dict(), other)
    assert get_segmenter(spec.replace("w.pt", "w2.pt")).fingerprint() != seg.fingerprint()
    with pytest.raises(ValueError, match="labels"):
        get_segmenter(f"segmenter:model={tmp_path}/segnet.py:build")
    with pytest.raises(ValueError, match="colour"):
        get_segmenter(spec + ",colour=1")


def test_wraps_a_torchvision_segmentation_network():
    torchvision = pytest.importorskip("torchvision")
    net = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=4
    ).eval()
    seg = ModelSegmenter(net, ["__background__", "a", "b", "c"], parts=True)
    out = seg.segment(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert out["object"].shape == (2, 1, 32, 32) and out["part"].shape == (2, 2, 32, 32)
    assert out["object"].min() >= 0 and out["object"].max() <= 3
    assert out["part"].max() <= 3 + 12
    on_object = out["object"][:, 0] > 0
    assert (out["part"][:, 0][on_object] > 0).all() and (out["part"][:, 0][~on_object] == 0).all()
