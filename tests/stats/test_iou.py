"""IoU tallies against a brute-force per-pixel computation and hand-built cases."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nethook.stats import persist
from nethook.stats.base import from_state_dict, states_equal
from nethook.stats.iou import IoU


def brute_force(masks, labels, image_labels, concept_category, num_categories):
    """Reference tallies: per image, a full [C, H, W] presence map, summed pixel by pixel."""
    n, u, h, w = masks.shape
    c = len(concept_category)
    inter = np.zeros((u, c), np.int64)
    label_area = np.zeros(c, np.int64)
    unit_area = np.zeros((u, num_categories), np.int64)
    for i in range(n):
        has = np.zeros((c, h, w), bool)
        for layer in labels[i]:
            for cid in range(c):
                has[cid] |= layer == cid
        if image_labels is not None:
            for cid in image_labels[i]:
                has[cid] = True
        has[0] = False
        m = masks[i].astype(np.int64)
        inter += np.einsum("uhw,chw->uc", m, has.astype(np.int64))
        label_area += has.sum((1, 2))
        for k in {int(concept_category[cid]) for cid in range(1, c) if has[cid].any()}:
            unit_area[:, k] += m.sum((1, 2))
    cond = np.zeros((u, c), np.int64)
    real = concept_category >= 0
    real[0] = False
    cond[:, real] = unit_area[:, concept_category[real]]
    union = cond + label_area[None] - inter
    union[:, ~real] = 0
    iou = np.divide(inter, union, out=np.zeros((u, c)), where=union > 0)
    return inter, label_area, unit_area, iou


def assert_matches_brute_force(stat, masks, labels, image_labels, table, k) -> None:
    """Every tally of ``stat`` equals the brute-force count on the same data."""
    inter, label_area, unit_area, iou = brute_force(masks, labels, image_labels, table, k)
    np.testing.assert_array_equal(stat.intersection(), inter)
    np.testing.assert_array_equal(stat.label_area(), label_area)
    np.testing.assert_array_equal(stat.unit_area(), unit_area)
    np.testing.assert_array_equal(stat.unit_area_total(), masks.sum((0, 2, 3)))
    np.testing.assert_allclose(stat.iou(), iou, rtol=0, atol=1e-15)


def random_case(
    seed, n, u, h, w, layers, k_img, num_concepts, num_categories, sparsity, density=1.0
):
    """Random masks (each unit on at most ``density``) and labels from the concept table."""
    rng = np.random.default_rng(seed)
    table = rng.integers(0, num_categories, num_concepts)
    table[0] = -1
    table[rng.random(num_concepts) < 0.2] = -1
    table[1] = 0
    ids = np.nonzero(table >= 0)[0]
    masks = rng.random((n, u, h, w)) < density * rng.random((1, u, 1, 1))
    labels = rng.choice(ids, (n, layers, h, w))
    labels[rng.random(labels.shape) < sparsity] = 0
    image_labels = rng.choice(ids, (n, k_img))
    image_labels[rng.random(image_labels.shape) < 0.5] = 0
    return table, masks, labels, image_labels


METHODS = ["auto", "gemm", "sparse"]
case_args = dict(
    seed=st.integers(0, 2**31),
    n=st.integers(0, 5),
    u=st.integers(1, 5),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    layers=st.integers(0, 3),
    k_img=st.integers(0, 2),
    num_concepts=st.integers(2, 9),
    num_categories=st.integers(1, 3),
    sparsity=st.sampled_from([0.0, 0.5, 0.95, 1.0]),
    density=st.sampled_from([0.0, 0.03, 0.2, 1.0]),
)


@settings(max_examples=60, deadline=None)
@given(
    chunk_bytes=st.sampled_from([1, 50, 1000, 64 << 20]),
    method=st.sampled_from(METHODS),
    **case_args,
)
def test_matches_brute_force(chunk_bytes, method, **case):
    table, masks, labels, image_labels = random_case(**case)
    k = case["num_categories"]
    cats = [f"cat{i}" for i in range(k)]
    stat = IoU(case["u"], table, categories=cats, chunk_bytes=chunk_bytes, method=method)
    stat.update(torch.from_numpy(masks), torch.from_numpy(labels), torch.from_numpy(image_labels))
    assert_matches_brute_force(stat, masks, labels, image_labels, table, k)
    assert stat.image_count == case["n"]


@settings(max_examples=25, deadline=None)
@given(
    chunk_bytes=st.sampled_from([1, 1000, 64 << 20]), method=st.sampled_from(METHODS), **case_args
)
def test_torch_only_paths_match_brute_force(chunk_bytes, method, **case):
    """The paths accelerators take (no numpy kernels), exercised on CPU."""
    table, masks, labels, image_labels = random_case(**case)
    acts = torch.from_numpy(masks).float() + 0.5
    stat = IoU(case["u"], table, categories=["a", "b", "c"], chunk_bytes=chunk_bytes, method=method)
    with mock.patch("nethook.stats.iou._numpy_view", return_value=None):
        stat.update(acts, labels, image_labels, thresholds=torch.ones(case["u"]))
    inter, label_area, unit_area, _ = brute_force(masks, labels, image_labels, table, 3)
    np.testing.assert_array_equal(stat.intersection(), inter)
    np.testing.assert_array_equal(stat.label_area(), label_area)
    np.testing.assert_array_equal(stat.unit_area(), unit_area)


@settings(max_examples=50, deadline=None)
@given(torch_only=st.booleans(), **case_args)
def test_update_on_entries_matches_brute_force(torch_only, **case):
    """Tallies from the on entries (image, unit, pixel) equal those of the dense masks."""
    table, masks, labels, image_labels = random_case(**case)
    k = case["num_categories"]
    w = case["w"]
    image, unit, y, x = np.nonzero(masks)
    order = np.random.default_rng(case["seed"]).permutation(len(image))  # any order
    stat = IoU(case["u"], table, categories=[f"cat{i}" for i in range(k)])
    with (
        mock.patch("nethook.stats.iou._numpy_view", return_value=None)
        if torch_only
        else (contextlib.nullcontext())
    ):
        stat.update_on(image[order], unit[order], (y * w + x)[order], labels, image_labels)
    assert_matches_brute_force(stat, masks, labels, image_labels, table, k)
    dense = IoU(case["u"], table, categories=[f"cat{i}" for i in range(k)])
    dense.update(torch.from_numpy(masks), labels, image_labels)
    assert states_equal(stat.state_dict(), dense.state_dict())


@settings(max_examples=50, deadline=None)
@given(torch_only=st.booleans(), wide=st.booleans(), **case_args)
def test_update_flat_matches_brute_force(torch_only, wide, **case):
    """Tallies from the flat indices of the on entries, in any order and either index
    dtype, equal those of the dense masks."""
    table, masks, labels, image_labels = random_case(**case)
    k = case["num_categories"]
    index = np.flatnonzero(masks).astype(np.int64 if wide else np.int32)
    index = index[np.random.default_rng(case["seed"]).permutation(len(index))]
    stat = IoU(case["u"], table, categories=[f"cat{i}" for i in range(k)])
    with (
        mock.patch("nethook.stats.iou._numpy_view", return_value=None)
        if torch_only
        else (contextlib.nullcontext())
    ):
        stat.update_flat(index, labels, image_labels)
    assert_matches_brute_force(stat, masks, labels, image_labels, table, k)
    dense = IoU(case["u"], table, categories=[f"cat{i}" for i in range(k)])
    dense.update(torch.from_numpy(masks), labels, image_labels)
    assert states_equal(stat.state_dict(), dense.state_dict())


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(1, 4),
    layers=st.integers(1, 4),
    block=st.sampled_from([1, 3, 8]),
    shared=st.booleans(),
    overlap=st.booleans(),
)
def test_labels_in_regions_match_brute_force(seed, n, layers, block, shared, overlap):
    """Label maps made of uniform blocks (counted run by run), with ids that repeat across
    layers at a pixel (``shared``) and pixel labels that are also whole-image labels."""
    rng = np.random.default_rng(seed)
    h = w = 16
    table = np.array([-1, 0, 0, 0, 1, 1, 1, 2, 2])
    pools = [np.arange(1, 9)] * layers if shared else np.array_split(np.arange(1, 9), layers)
    grid = -(-h // block)
    labels = np.zeros((n, layers, h, w), np.uint8)
    for layer, pool in enumerate(pools):
        coarse = rng.choice(np.concatenate([[0], pool]), (n, grid, grid))
        labels[:, layer] = coarse.repeat(block, 1).repeat(block, 2)[:, :h, :w]
    image_labels = rng.choice([0, 1, 7] if overlap else [0], (n, 2))
    masks = rng.random((n, 3, h, w)) < 0.1
    stat = IoU(3, table)
    stat.update_flat(np.flatnonzero(masks), labels, image_labels)
    assert_matches_brute_force(stat, masks, labels, image_labels, table, 3)


def test_uniform_label_maps_count_per_image_and_layer():
    """One id over every pixel of every layer of every image: one run per image and layer
    (a run across images would lose the id from the second image's categories, one
    across layers its repeat)."""
    table = np.array([-1, 0, 1])
    labels = np.ones((2, 2, 4, 4), np.uint8)
    labels[1, 1] = 2
    masks = np.random.default_rng(0).random((2, 2, 4, 4)) < 0.5
    stat = IoU(2, table)
    stat.update_flat(np.flatnonzero(masks), labels)
    assert_matches_brute_force(stat, masks, labels, None, table, 2)


def test_update_flat_names_bad_indices():
    stat = IoU(2, np.array([-1, 0, 0]))
    labels = np.zeros((1, 2, 3), np.int64)
    with pytest.raises(ValueError, match=r"must lie in 0\.\.11, got 3\.\.12"):
        stat.update_flat([3, 12], labels)
    with pytest.raises(ValueError, match="integer flat indices"):
        stat.update_flat(np.array([1.0]), labels)


def test_update_on_names_bad_entries():
    stat = IoU(2, np.array([-1, 0, 0]))
    labels = np.zeros((1, 2, 3), np.int64)
    with pytest.raises(ValueError, match=r"unit indices must lie in 0..1, got 0..2"):
        stat.update_on([0, 0], [0, 2], [1, 1], labels)
    with pytest.raises(ValueError, match=r"pixel indices must lie in 0..5"):
        stat.update_on([0], [0], [6], labels)
    with pytest.raises(ValueError, match="one length"):
        stat.update_on([0], [0, 1], [1], labels)


@settings(max_examples=30, deadline=None)
@given(data=st.data(), **case_args)
def test_merge_of_any_split_equals_one_pass(data, **case):
    table, masks, labels, image_labels = random_case(**case)
    n = case["n"]
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=3)))
    bounds = [0, *cuts, n]
    whole = IoU(case["u"], table)
    whole.update(masks, labels, image_labels)
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        part = IoU(case["u"], table)
        part.update(masks[a:b], labels[a:b], image_labels[a:b])
        parts.append(part)
    order = data.draw(st.permutations(range(len(parts))))
    merged = parts[order[0]]
    for j in order[1:]:
        merged.merge(parts[j])
    for key, value in whole.state_dict().items():
        np.testing.assert_array_equal(merged.state_dict()[key], value, err_msg=key)


@settings(max_examples=30, deadline=None)
@given(method=st.sampled_from(METHODS), **case_args)
def test_activations_with_thresholds_equal_their_masks(method, **case):
    table, masks, labels, image_labels = random_case(**case)
    rng = np.random.default_rng(case["seed"])
    acts = rng.standard_normal(masks.shape).astype(np.float32)
    thresholds = rng.standard_normal(case["u"]).astype(np.float32)
    by_act = IoU(case["u"], table, method=method)
    by_act.update(acts, labels, image_labels, thresholds=thresholds)
    by_mask = IoU(case["u"], table)
    by_mask.update(acts >= thresholds[None, :, None, None], labels, image_labels)
    np.testing.assert_array_equal(by_act.intersection(), by_mask.intersection())
    np.testing.assert_array_equal(by_act.unit_area(), by_mask.unit_area())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int32])
def test_activation_dtypes(dtype):
    table, masks, labels, image_labels = random_case(7, 3, 4, 5, 6, 2, 1, 6, 2, 0.3)
    acts = torch.randn(3, 4, 5, 6).mul(4).to(dtype)
    thresholds = torch.tensor([-1.0, 0.3, 1.1, 2.7], dtype=torch.float64)
    if dtype.is_floating_point:  # activations right at the rounding of each threshold
        near = thresholds.to(dtype)
        acts[0, :, 0, :2] = torch.stack([near, torch.nextafter(near, near + 1)], 1)
    masks = (acts.double() >= thresholds[:, None, None]).numpy()
    for method in METHODS:
        by_act = IoU(4, table, method=method)
        by_act.update(acts, labels, image_labels, thresholds=thresholds)
        expected = brute_force(masks, labels, image_labels, table, 2)
        np.testing.assert_array_equal(by_act.intersection(), expected[0])
        np.testing.assert_array_equal(by_act.unit_area(), expected[2])


def test_category_conditioning_by_hand():
    """Unit 0 covers object 1 exactly in image 0 and all of image 1, which has no object.

    Conditioned, image 1's area does not count towards the object's union (IoU 1);
    the part in image 1's top row gets 4 / 16 since only image 1 carries parts.
    """
    table = np.array([-1, 0, 1])
    masks = np.zeros((2, 2, 4, 4), bool)
    masks[0, 0, :, :2] = True
    masks[1, 0] = True
    labels = np.zeros((2, 4, 4), np.int64)
    labels[0, :, :2] = 1
    labels[1, 0, :] = 2
    stat = IoU(2, table, categories=["object", "part"])
    stat.update(masks, labels)
    assert stat.iou()[0, 1] == 1.0
    assert stat.iou()[0, 2] == 0.25
    np.testing.assert_array_equal(stat.unit_area(), [[8, 16], [0, 0]])
    np.testing.assert_array_equal(stat.unit_area_total(), [24, 0])
    np.testing.assert_array_equal(stat.category_image_count(), [1, 1])
    np.testing.assert_array_equal(stat.iou()[1], [0, 0, 0])


def test_repeated_and_image_labels_count_once():
    """A concept given twice at a pixel, or as pixel and whole-image label, counts once."""
    table = np.array([-1, 0, 1])
    masks = np.ones((1, 1, 3, 3), bool)
    labels = np.ones((1, 2, 3, 3), np.int64)
    labels[0, 1, 0, 0] = 2
    stat = IoU(1, table)
    stat.update(masks, labels, image_labels=np.array([[2, 2, 0]]))
    np.testing.assert_array_equal(stat.label_area(), [0, 9, 9])
    np.testing.assert_array_equal(stat.intersection(), [[0, 9, 9]])
    assert stat.iou()[0].tolist() == [0.0, 1.0, 1.0]


def test_label_dicts_and_concepts_table():
    """ConceptSource-style inputs: a concepts DataFrame and per-category label dicts."""
    concepts = pd.DataFrame(
        {
            "id": [1, 2, 4],
            "name": ["sky", "wheel", "indoor"],
            "category": ["object", "part", "scene"],
        }
    )
    stat = IoU(1, concepts)
    assert stat.categories == ["object", "part", "scene"]
    masks = np.zeros((1, 1, 2, 2), bool)
    masks[0, 0, 0] = True
    labels = {
        "object": np.array([[[[1, 1], [0, 0]]]]),
        "part": np.array([[[[0, 2], [2, 2]]]]),
    }
    stat.update(masks, labels, image_labels={"scene": np.array([[4]])})
    da = stat.iou_xarray()
    assert da.dims == ("unit", "concept")
    assert da.concept.values.tolist() == [1, 2, 4]
    assert da.concept_name.values.tolist() == ["sky", "wheel", "indoor"]
    assert da.concept_category.values.tolist() == ["object", "part", "scene"]
    assert da.sel(unit=0, concept=1).item() == 1.0
    assert da.sel(unit=0, concept=2).item() == pytest.approx(1 / 4)
    assert da.sel(unit=0, concept=4).item() == pytest.approx(2 / 4)
    ds = stat.to_xarray()
    assert ds["union"].sel(unit=0, concept=2).item() == 4
    assert ds["label_area"].sel(concept=4).item() == 4
    assert ds["unit_area"].sel(unit=0, category="scene").item() == 2
    assert stat.iou_xarray(units=["u7"]).unit.values.tolist() == ["u7"]


def test_state_round_trip_is_exact_and_plain(tmp_path):
    table, masks, labels, image_labels = random_case(3, 4, 3, 5, 4, 2, 1, 7, 2, 0.5)
    stat = IoU(3, table, concept_names=[f"c{i}" for i in range(7)])
    stat.update(masks[:2], labels[:2], image_labels[:2])
    np.savez(tmp_path / "s.npz", **stat.state_dict())
    with np.load(tmp_path / "s.npz", allow_pickle=False) as f:
        loaded = from_state_dict({k: f[k] for k in f.files})
    assert isinstance(loaded, IoU)
    for key, value in stat.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[key], value, err_msg=key)
    stat.update(masks[2:], labels[2:], image_labels[2:])
    loaded.update(masks[2:], labels[2:], image_labels[2:])
    np.testing.assert_array_equal(loaded.iou(), stat.iou())
    assert loaded.concept_names == stat.concept_names


@pytest.mark.parametrize("name", ["iou.npz", "iou.zarr"])
def test_persist_round_trip(tmp_path, name):
    table, masks, labels, image_labels = random_case(4, 3, 3, 4, 4, 2, 1, 6, 2, 0.5)
    stat = IoU(3, table, categories=["object", "scene"], concept_names=list("abcdef"))
    stat.update(masks, labels, image_labels)
    loaded = persist.load(persist.save(stat, tmp_path / name))
    assert states_equal(loaded.state_dict(), stat.state_dict())
    np.testing.assert_array_equal(loaded.iou(), stat.iou())


def test_newer_state_version_is_refused():
    sd = IoU(1, np.array([-1, 0])).state_dict()
    sd["version"] = IoU.version + 1
    with pytest.raises(ValueError, match="newer"):
        from_state_dict(sd)


def test_empty_batch_and_to_device():
    stat = IoU(2, np.array([-1, 0]))
    stat.update(np.zeros((0, 2, 3, 3), bool), np.zeros((0, 3, 3), np.int64))
    assert stat.image_count == 0 and stat.to("cpu") is stat
    assert stat.iou().shape == (2, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    table, masks, labels, image_labels = random_case(5, 4, 6, 9, 7, 2, 1, 8, 2, 0.3)
    cpu = IoU(6, table)
    cpu.update(masks, labels, image_labels)
    gpu = IoU(6, table).to("cuda")
    gpu.update(torch.from_numpy(masks).cuda(), torch.from_numpy(labels).cuda(), image_labels)
    np.testing.assert_array_equal(gpu.intersection(), cpu.intersection())
    np.testing.assert_array_equal(gpu.unit_area(), cpu.unit_area())


BAD_UPDATES = [
    (
        "masks",
        dict(masks=np.zeros((2, 3, 4), bool)),
        r"masks \[N, U, H, W\].*got shape \(2, 3, 4\)",
    ),
    ("units", dict(masks=np.zeros((2, 5, 4, 4), bool)), r"U = 3.*\(2, 5, 4, 4\)"),
    ("dtype", dict(masks=np.zeros((2, 3, 4, 4), np.float32)), r"bool masks.*float32"),
    ("thr", dict(thresholds=np.zeros(4)), r"thresholds of shape \[U\] = \(3,\), got \(4,\)"),
    ("rank", dict(labels=np.zeros((2, 4), np.int64)), r"\[N, H, W\] or \[N, L, H, W\].*\(2, 4\)"),
    ("n", dict(labels=np.zeros((3, 4, 4), np.int64)), r"N = 3 images, masks have 2"),
    ("hw", dict(labels=np.zeros((2, 4, 5), np.int64)), r"4x5 but masks are 4x4"),
    ("float", dict(labels=np.zeros((2, 4, 4))), r"integer concept ids.*float64"),
    ("range", dict(labels=np.full((2, 4, 4), 9)), r"concept id 9, outside.*0\.\.3"),
    ("negative", dict(labels=np.full((2, 4, 4), -1)), r"concept id -1, outside"),
    ("gap", dict(labels=np.full((2, 4, 4), 2)), r"concept ids \[2\] that are not in"),
    ("img", dict(image_labels=np.zeros((3, 1), np.int64)), r"image_labels of shape \[N, K\]"),
    ("img id", dict(image_labels=np.full((2, 1), 7)), r"image_labels contain concept id 7"),
]


@pytest.mark.parametrize("case", BAD_UPDATES, ids=[b[0] for b in BAD_UPDATES])
def test_bad_input_names_expected_and_got(case):
    _, override, message = case
    stat = IoU(3, np.array([-1, 0, -1, 1]), chunk_bytes=1)  # several blocks and threads
    args = dict(masks=np.zeros((2, 3, 4, 4), bool), labels=np.ones((2, 4, 4), np.int64))
    if "thresholds" in override:
        args["masks"] = np.zeros((2, 3, 4, 4), np.float32)
    args.update(override)
    with pytest.raises(ValueError, match=message):
        stat.update(**args)
    assert stat.image_count == 0 and stat.intersection().sum() == 0


def test_bad_construction_and_merge():
    with pytest.raises(ValueError, match="1-D int array"):
        IoU(2, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="missing"):
        IoU(2, pd.DataFrame({"id": [1]}))
    with pytest.raises(ValueError, match="only 1 categories"):
        IoU(2, np.array([-1, 0, 1]), categories=["object"])
    with pytest.raises(ValueError, match="2 units into one of 3"):
        IoU(3, np.array([-1, 0])).merge(IoU(2, np.array([-1, 0])))
    with pytest.raises(ValueError, match="different concept tables"):
        IoU(2, np.array([-1, 0])).merge(IoU(2, np.array([-1, 0, 0])))


def test_docs_example_runs():
    """The python examples of the IoU section of docs/stats.md run as written."""
    doc = (Path(__file__).parents[2] / "docs" / "stats.md").read_text()
    section = doc.split("\n## IoU\n", 1)[1].split("\n## ", 1)[0]
    examples = re.findall(r"```python\n(.*?)```", section, re.S)
    assert examples
    for example in examples:
        exec(compile(example, "docs/stats.md (IoU)", "exec"), {})


def test_activations_that_require_grad():
    acts = torch.randn(2, 3, 4, 4, requires_grad=True) * 2
    labels = torch.randint(0, 3, (2, 4, 4))
    for method in METHODS:
        stat = IoU(3, np.array([-1, 0, 1]), method=method)
        stat.update(acts, labels, thresholds=torch.zeros(3))
        masks = (acts >= 0).numpy()
        np.testing.assert_array_equal(
            stat.intersection(),
            brute_force(masks, labels[:, None].numpy(), None, stat.concept_category, 2)[0],
        )
