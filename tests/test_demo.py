"""The demo model dissected: the thesis's hierarchy and axis-alignment effects appear.

The facts checked here were measured on the shipped weights (see
``nethook/demo/MODEL_CARD.md``); each test dissects fresh procedural scenes whose
seeds differ from the training and held-out sets.
"""

from __future__ import annotations

import numpy as np
import pytest

from nethook.demo.scene_cnn import SCENES, scene_cnn
from nethook.dissect import dissect, summary_table

MODEL = "nethook.demo.scene_cnn:scene_cnn"
FAST = dict(batch_size=50, progress=False, gallery_size=None, topk=1)


def object_or_part(summary, layer: str) -> int:
    row = summary.set_index("layer").loc[layer]
    return int(row.get("object", 0) + row.get("part", 0))


def test_demo_model_loads_and_classifies() -> None:
    import torch

    from nethook.plugins import get_source

    model = scene_cnn()
    source = get_source("scenes:n=60,size=64,seed=4242,progress=false")
    batch = source.collate([source[i] for i in range(len(source))])
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in source.normalization)
    with torch.no_grad():
        pred = model((batch["image"] - mean) / std).argmax(1)
    table = source.concepts()
    names = dict(zip(table["id"], table["name"], strict=True))
    truth = [SCENES.index(names[int(i)]) for i in batch["image_labels"]["scene"][:, 0]]
    accuracy = float((pred.numpy() == np.array(truth)).mean())
    assert accuracy > 0.6  # held-out accuracy on 1000 images is in the model card; chance is 1/6


def test_deeper_layers_have_more_object_and_part_detectors() -> None:
    results = dissect(
        MODEL, ["block1", "block4"], "scenes:n=100,size=64,seed=21,progress=false", **FAST
    )
    summary = summary_table(results)
    assert object_or_part(summary, "block4") > object_or_part(summary, "block1")


def test_rotation_lowers_interpretability_fast() -> None:
    src = "scenes:n=100,size=64,seed=22,progress=false"
    plain = dissect(MODEL, "block2", src, **FAST)["block2"]
    rotated = dissect(MODEL, "block2", src, rotate=1.0, **FAST)["block2"]
    assert int(summary_table({"r": rotated})["unique"][0]) < int(
        summary_table({"p": plain})["unique"][0]
    )
    assert float(rotated["label_iou"].mean()) < float(plain["label_iou"].mean())


@pytest.mark.slow
@pytest.mark.parametrize("seed", [3, 11])
def test_rotation_lowers_unique_detectors_all_layers(seed: int) -> None:
    layers = ["block1", "block2", "block3", "block4"]
    src = f"scenes:n=200,size=64,seed={seed},progress=false"
    plain = dissect(MODEL, layers, src, **FAST)
    rotated = dissect(MODEL, layers, src, rotate=1.0, **FAST)
    assert summary_table(rotated)["unique"].sum() < summary_table(plain)["unique"].sum()
    for layer in layers:
        assert float(rotated[layer]["label_iou"].mean()) < float(plain[layer]["label_iou"].mean())
    summary = summary_table(plain)
    for layer in ("block3", "block4"):
        assert object_or_part(summary, layer) > object_or_part(summary, "block1")


def test_demo_command_writes_report(tmp_path, capsys) -> None:
    from nethook.cli import main

    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--images", "40", "--no-sweep", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    for layer in ("block1", "block2", "block3", "block4"):
        assert layer in printed
    assert "detectors" in printed and "object" in printed
    assert (out / "index.html").is_file() and (out / "results.csv").is_file()
    import json

    doc = json.loads((out / "results.json").read_text())
    assert [len(doc["layers"][b]["units"]) for b in ("block1", "block4")] == [16, 128]
