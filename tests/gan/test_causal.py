"""Interventions and ACE on the planted generator: ground truth known by construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gan_planted import CAUSAL, DECOY, UNITS

from nethook.causal import (
    ablation_curve,
    average_causal_effect,
    context_test,
    insertion_constant,
    search_causal_units,
)
from nethook.gandissect import sample_z


def red_share(gen, z, edit_units=None, value=None):
    """Direct computation: run the two halves by hand with units forced to ``value``."""
    with torch.no_grad():
        r = gen.layer(z)
        if edit_units is not None:
            r = r.clone()
            r[:, edit_units] = value[edit_units, None, None] if value is not None else 0
        return (gen.output(r)[:, 0] > 0.5).float().mean().item()


def test_insertion_constant_is_coverage_weighted_mean(planted):
    gen, seg = planted
    k = insertion_constant(gen, "layer", seg, "tree", n=40, seed=5)
    z = sample_z(gen, 40, 5)
    with torch.no_grad():
        r = gen.layer(z)
        red = (gen(z)[:, 0] > 0.5).float()
    w = torch.nn.functional.avg_pool2d(red[:, None], 4)[:, 0]  # share of each 4x4 cell
    direct = (r * w[:, None]).sum(dim=(0, 2, 3)) / w.sum()
    assert torch.allclose(k, direct.float(), atol=1e-5)


def test_ace_matches_direct_computation(planted):
    gen, seg = planted
    k = insertion_constant(gen, "layer", seg, "tree", n=40)
    units = list(CAUSAL)
    effect = average_causal_effect(gen, "layer", seg, "tree", units, k, n=50, seed=3)
    z = sample_z(gen, 50, 3)
    base = red_share(gen, z)
    ablated = red_share(gen, z, units)
    inserted = red_share(gen, z, units, k)
    assert effect.base == pytest.approx(base, abs=1e-6)
    assert effect.ace == pytest.approx((inserted - ablated) / base, abs=1e-5)
    assert effect.removed == pytest.approx(1.0)  # the planted units are the only red source


def test_decoy_has_no_causal_effect(planted):
    gen, seg = planted
    k = insertion_constant(gen, "layer", seg, "tree", n=40)
    effect = average_causal_effect(gen, "layer", seg, "tree", [DECOY], k, n=30)
    assert effect.ace == pytest.approx(0.0)


def test_search_ranks_planted_units_first_despite_iou_decoy(planted, tmp_path):
    gen, seg = planted
    k = insertion_constant(gen, "layer", seg, "tree", n=40)
    iou = np.full(UNITS, 0.2)
    iou[DECOY] = 0.5  # IoU init favours the decoy
    kwargs = dict(epochs=3, steps_per_epoch=3, batch_size=6, lr=0.1, progress=False)
    result = search_causal_units(gen, "layer", seg, "tree", k, iou, **kwargs)
    assert set(result.top(3)) == set(CAUSAL)
    assert result.alpha[DECOY] < min(result.alpha[list(CAUSAL)])
    # resumable: a checkpointed run stopped after 2 epochs and resumed gives the same alpha
    ckpt = tmp_path / "search.pt"
    search_causal_units(
        gen, "layer", seg, "tree", k, iou, checkpoint=ckpt, **{**kwargs, "epochs": 2}
    )
    resumed = search_causal_units(gen, "layer", seg, "tree", k, iou, checkpoint=ckpt, **kwargs)
    assert resumed.epoch == 3
    np.testing.assert_allclose(resumed.alpha, result.alpha, atol=1e-6)


def test_ablation_curve_and_context(planted):
    gen, seg = planted
    k = insertion_constant(gen, "layer", seg, "tree", n=40)
    curve = ablation_curve(
        gen, "layer", seg, "tree", {"causal": [*CAUSAL, 0], "decoy": [DECOY, 0, 1, 3]},
        counts=(1, 3), n=30,
    )  # fmt: skip
    assert curve.sel(ranking="causal", units=3).item() == pytest.approx(1.0)
    assert curve.sel(ranking="decoy", units=3).item() == pytest.approx(0.0)
    heat, table, images = context_test(gen, "layer", seg, "tree", list(CAUSAL), k, n=2)
    assert heat.shape == (2, 8, 8) and images.shape == (2, 32, 32, 3)
    # red can only be inserted where it is not already: effect there is positive
    assert heat.values.max() > 0.5
    assert set(table["context"]) <= {"tree", "sky", "none"}


def test_bad_input_is_named(planted):
    """Unknown concepts list close names; a layer that is not a feature map names its shape."""
    gen, seg = planted
    with pytest.raises(ValueError, match=r"unknown concept 'skye'.*did you mean sky"):
        insertion_constant(gen, "layer", seg, "skye", n=4)
    with pytest.raises(ValueError, match=r"layer 'layer.linear' outputs \(4, 768\)"):
        insertion_constant(gen, "layer.linear", seg, "tree", n=4, batch_size=4)
    k = torch.zeros(UNITS)
    with pytest.raises(ValueError, match=r"layer 'layer.linear' outputs \(2, 768\)"):
        search_causal_units(
            gen, "layer.linear", seg, "tree", k, epochs=1, steps_per_epoch=1, batch_size=2,
            progress=False,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"iou has shape \(3,\); expected one value per unit"):
        search_causal_units(gen, "layer", seg, "tree", k, np.ones(3), progress=False)
