"""The demo models and the scenes-seg segmenter plugin."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gan_planted import scenes_seg


def test_generator_is_deterministic_per_sample_and_in_range():
    from nethook.gan.generator import Generator, sample_z

    gen = Generator().eval()
    z = sample_z(6, seed=1)
    with torch.no_grad():
        full = gen(z)
        alone = gen(z[:2])
    assert full.shape == (6, 3, 32, 32)
    assert 0 <= full.min() and full.max() <= 1
    torch.testing.assert_close(full[:2], alone)  # no batch statistics
    with pytest.raises(ValueError, match=r"expected z of shape \[B, 64\]"):
        gen(torch.zeros(2, 5))


def test_scenes_seg_labels_real_scenes_with_scenes_ids():
    from nethook.plugins import get_source

    seg = scenes_seg()
    source = get_source("scenes:n=40,size=32,seed=1234,progress=0")
    batch = source.collate([source[i] for i in range(40)])
    labels = seg.segment(batch["image"])
    assert labels["object"].shape == (40, 1, 32, 32)
    assert labels["part"].shape == (40, 3, 32, 32)
    truth = batch["labels"]["object"][:, 0]
    accuracy = (labels["object"][:, 0] == truth).float().mean().item()
    assert accuracy > 0.8  # held-out scenes; the model card quotes 0.90 on 1000
    table = seg.concepts()
    scenes_table = source.concepts()
    shared = table.merge(scenes_table, on="id", suffixes=("", "_scenes"))
    assert (shared["name"] == shared["name_scenes"]).all()
    # c-t / c-b halves: a pixel of object c carries exactly one of c-t, c-b
    names = dict(zip(table["id"], table["name"], strict=True))
    obj = labels["object"][:, 0]
    half = labels["part"][:, 1]
    on = obj > 0
    assert all(
        names[int(h)].rsplit("-", 1)[0] == names[int(o)]
        for o, h in zip(obj[on][:500], half[on][:500], strict=True)
    )


def test_scenes_seg_resizes_other_sizes():
    seg = scenes_seg()
    out = seg.segment(torch.rand(2, 3, 48, 40))
    assert out["object"].shape == (2, 1, 48, 40)
    with pytest.raises(ValueError, match=r"expected images \[B, 3, H, W\]"):
        seg.segment(torch.rand(3, 32, 32))


def test_ablating_top_grass_units_removes_more_grass_than_random_units():
    from nethook.causal import ablation_curve
    from nethook.gan.generator import scene_gan
    from nethook.gandissect import gandissect

    gen, seg = scene_gan(), scenes_seg()
    ds = gandissect(gen, "layer2", seg, n=40, concepts=["grass"], gallery=0, progress=False)
    top = [int(u) for u in np.argsort(-ds["iou"].values[:, 0], kind="stable")]
    random_units = [int(u) for u in np.random.default_rng(0).permutation(64)]
    curve = ablation_curve(
        gen, "layer2", seg, "grass", {"top": top, "random": random_units}, counts=(10,), n=30
    )
    removed_top = curve.sel(ranking="top", units=10).item()
    removed_random = curve.sel(ranking="random", units=10).item()
    assert removed_top > removed_random + 0.2
