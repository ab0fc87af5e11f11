"""gandissect: I/H thresholds on constructed masks, exact IoU on the planted generator, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gan_planted import CAUSAL, DECOY
from hypothesis import given, settings
from hypothesis import strategies as st

from nethook.gandissect import (
    LayerDistribution,
    candidate_levels,
    concept_presence,
    gandissect,
    generate,
    information_quality_ratio,
    iqr_thresholds,
    pixels,
    sample_z,
)
from nethook.upsample import upsample


def exact_iqr(a: np.ndarray, s: np.ndarray, t: float) -> float:
    """I/H of (a > t, s) from exact counts."""
    m = a > t
    return float(information_quality_ratio((m & s).mean(), m.mean(), s.mean()))


def distribution(a: np.ndarray, s: np.ndarray) -> LayerDistribution:
    dist = LayerDistribution(pixel_step=1)
    presence = torch.zeros(len(a), 2, dtype=torch.bool)
    presence[:, 1] = torch.as_tensor(s)
    dist.update(torch.as_tensor(a, dtype=torch.float32)[:, None], presence)
    return dist


def test_separable_masks_get_a_threshold_between_the_classes():
    rng = np.random.default_rng(0)
    s = rng.random(20000) < 0.3
    a = np.where(s, 1 + rng.random(len(s)), rng.random(len(s)))
    thr, iqr = iqr_thresholds(distribution(a, s), [1])
    candidates = np.quantile(a, candidate_levels())
    best = max(exact_iqr(a, s, t) for t in candidates)
    assert exact_iqr(a, s, thr[0, 0]) >= best - 2e-3
    assert best > 0.9  # a candidate lies within a few pixels' share of the class boundary
    assert a[~s].max() - 0.05 <= thr[0, 0] < a[s].min()


@pytest.mark.parametrize("share", [0.3, 0.03, 0.004])
def test_threshold_is_mutual_information_optimal(share):
    rng = np.random.default_rng(1)
    n = 20000
    s = rng.random(n) < share
    a = rng.normal(0, 1, n) + 2.5 * s
    thr, iqr = iqr_thresholds(distribution(a, s), [1])
    grid = np.quantile(a, np.linspace(0.001, 0.9995, 400))
    best = max(exact_iqr(a, s, t) for t in grid)
    assert exact_iqr(a, s, thr[0, 0]) >= best - 0.01
    assert iqr[0, 0] == pytest.approx(exact_iqr(a, s, thr[0, 0]), abs=0.01)


@settings(max_examples=60, deadline=None)
@given(
    st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.floats(0.0, 1.0),
)  # fmt: skip
def test_iqr_is_a_ratio_symmetric_in_mask_and_label(both, mask, label):
    both = min(both, mask, label)
    if both < mask + label - 1:
        both = mask + label - 1
    r = information_quality_ratio(both, mask, label)
    assert 0.0 <= r <= 1.0 + 1e-12
    assert r == pytest.approx(information_quality_ratio(both, label, mask), abs=1e-12)


def test_iqr_is_one_when_mask_equals_label_and_zero_when_independent():
    assert information_quality_ratio(0.2, 0.2, 0.2) == pytest.approx(1.0)
    assert information_quality_ratio(0.06, 0.2, 0.3) == pytest.approx(0.0, abs=1e-12)


def test_planted_dissection_matches_direct_iou(planted):
    gen, seg = planted
    ds = gandissect(gen, "layer", seg, n=60, batch_size=30, progress=False, gallery=3, thumbnail=16)
    # direct IoU on the report sample with the returned thresholds
    b = generate(gen, "layer", sample_z(gen, 60, ds.attrs["report_seed"]), seg)
    acts = pixels(b.features, (32, 32), (32, 32)).numpy()
    presence = concept_presence(b.labels, 3).numpy()
    thr = ds["concept_threshold"].values
    for u in (CAUSAL[0], DECOY, 0):
        for j, c in enumerate(ds["concept"].values):
            m = acts[:, u] > thr[u, j]
            direct = (m & presence[:, c]).sum() / max((m | presence[:, c]).sum(), 1)
            assert ds["iou"].values[u, j] == pytest.approx(direct, abs=1e-6)
    # the decoy copies causal unit 2's activations: equally informative thresholds (the
    # sketches of two identical channels may pick neighbouring candidates)
    assert ds["iqr"].sel(unit=DECOY).values == pytest.approx(
        ds["iqr"].sel(unit=CAUSAL[0]).values, abs=0.02
    )
    assert ds["label"].values[CAUSAL[0]] == "tree"
    assert ds["top_image"].shape == (12, 3, 16, 16, 3)
    assert ds["top_mask"].dtype == bool


def test_unknown_concept_lists_close_names(planted):
    gen, seg = planted
    with pytest.raises(ValueError, match=r"unknown concept 'tre'.*tree"):
        gandissect(gen, "layer", seg, n=4, concepts=["tre"], progress=False)


def test_layer_that_is_not_a_feature_map_names_its_shape(planted):
    gen, seg = planted
    with pytest.raises(ValueError, match=r"layer 'layer.linear' outputs \(4, 768\)"):
        gandissect(gen, "layer.linear", seg, n=4, batch_size=4, progress=False)


@pytest.mark.parametrize("size", [16, 48])
def test_galleries_show_each_units_top_images_and_masks(planted, size):
    """Top images by each unit's peak activation, as thumbnails (smaller and larger than
    the 32 px images), with the unit's mask at its threshold; small batches make the
    running top set change as the pass goes."""
    gen, seg = planted
    ds = gandissect(
        gen, "layer", seg, n=40, batch_size=7, gallery=3, thumbnail=size, progress=False
    )
    z = sample_z(gen, 40, ds.attrs["report_seed"])
    with torch.no_grad():
        r = gen.layer(z)
        images = gen(z)
    peak = r.amax(dim=(2, 3))
    thumbs = torch.nn.functional.interpolate(images.clamp(0, 1), size=(size, size), mode="nearest")
    thumbs = (thumbs * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    for u in range(r.shape[1]):
        want = torch.argsort(-peak[:, u], stable=True)[:3]
        assert ds["top_index"].values[u].tolist() == want.tolist()
        got = ds["top_image"].values[u].astype(int)
        assert np.abs(got - thumbs[want].numpy()).max() <= 1  # batch-size rounding only
        up = upsample(r[want, u : u + 1], (size, size), (32, 32))[:, 0]
        mask = (up > float(ds["threshold"].values[u])).numpy()
        assert (ds["top_mask"].values[u] != mask).mean() < 0.01  # float ties at the threshold
