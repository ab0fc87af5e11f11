"""Network Dissection end to end on a model whose detectors are planted by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nethook.dissect import dissect, load_results
from nethook.sources import ConceptSource, concept_frame

SIZE = 32
N = 40
RED, BLUE, SKY, GREY, STRIPE = 1, 2, 3, 4, 5


class Planted(ConceptSource):
    """Grey noisy images; 8x8 red squares in images 0-3, blue in 4-7, labels pixel-exact.

    Objects (red, blue, sky) are labelled only in images 0-19, so the object category's
    union is conditioned on those; every background pixel is "grey" (color). Images
    20-39 carry a whole-image texture label "stripe" on even indices.
    """

    categories = ("object", "color")
    image_categories = ("texture",)

    def __len__(self) -> int:
        return N

    @property
    def normalization(self):
        return ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        image = 0.4 + 0.05 * torch.rand(3, SIZE, SIZE, generator=g)
        obj = torch.zeros(1, SIZE, SIZE, dtype=torch.int64)
        color = torch.full((1, SIZE, SIZE), GREY, dtype=torch.int64)
        y, x = 3 * (i % 7) + 2, 2 * (i % 9) + 3
        if i < 8:
            rgb = torch.tensor([1.0, 0.0, 0.0] if i < 4 else [0.0, 0.0, 1.0])
            image[:, y : y + 8, x : x + 8] = rgb[:, None, None]
            obj[0, y : y + 8, x : x + 8] = RED if i < 4 else BLUE
            color[0, y : y + 8, x : x + 8] = 0
        if i < 20:
            obj[0, :4] = torch.where(obj[0, :4] == 0, SKY, obj[0, :4])
        tex = torch.tensor([STRIPE if i >= 20 and i % 2 == 0 else 0])
        return {
            "image": image,
            "labels": {"object": obj, "color": color},
            "image_labels": {"texture": tex},
            "index": i,
        }

    def concepts(self) -> pd.DataFrame:
        return concept_frame(
            [RED, BLUE, SKY, GREY, STRIPE],
            ["redthing", "bluething", "sky", "grey", "stripe"],
            ["object", "object", "object", "color", "texture"],
        )

    def fingerprint_parts(self) -> dict:
        return {"n": N, "size": SIZE}


def planted_model() -> nn.Sequential:
    """Unit 0 fires (0.5) exactly on red pixels, unit 1 on blue, unit 2 on grey noise."""
    conv = nn.Conv2d(3, 3, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, -1, -1], [-1, -1, 1], [1, 1, 1]]).view(3, 3, 1, 1))
        conv.bias.copy_(torch.tensor([-0.5, -0.5, -1.3]))
    return nn.Sequential(conv, nn.ReLU(), nn.AvgPool2d(2)).eval()


def as_dissected(layer: nn.Module, images: torch.Tensor, batch_size: int = 7) -> torch.Tensor:
    """``layer(images)`` computed as a dissection split over processes computes it: in
    batches, on one torch thread (convolutions round differently on more threads,
    which moves cells that lie within a rounding error of a threshold)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return torch.cat([layer(images[i : i + batch_size]) for i in range(0, N, batch_size)])
    finally:
        torch.set_num_threads(threads)


def brute_force_iou(masks: np.ndarray, source: Planted) -> dict[int, np.ndarray]:
    """IoU per concept id, by definition: sums over images carrying the concept's category."""
    items = [source[i] for i in range(len(source))]
    table = source.concepts()
    out = {}
    for cid, cat in zip(table["id"], table["category"], strict=True):
        inter = np.zeros(masks.shape[1])
        union = np.zeros(masks.shape[1])
        for i, item in enumerate(items):
            if cat in item["labels"]:
                lab = item["labels"][cat].numpy()
                if not (lab > 0).any():
                    continue
                concept = (lab == cid).any(0)
            else:
                ids = item["image_labels"][cat].numpy()
                if not (ids > 0).any():
                    continue
                concept = np.full(masks.shape[-2:], cid in ids)
            m = masks[i]
            inter += (m & concept).sum((1, 2))
            union += (m | concept).sum((1, 2))
        out[int(cid)] = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return out


@pytest.fixture(scope="module", params=["store", "recompute"])
def dissected(request, tmp_path_factory):
    """The planted model dissected with pass 2 from the pass-1 store, and recomputed."""
    out = tmp_path_factory.mktemp(f"planted-{request.param}")
    model = planted_model()
    results = dissect(
        model,
        ["1", "2"],
        Planted(),
        out=out,
        batch_size=7,
        topk=3,
        progress=False,
        pass2=request.param,
        parallel=2,
    )
    return model, results, out


def test_planted_units_get_their_concepts(dissected) -> None:
    _, results, _ = dissected
    ds = results["1"]
    assert ds["label"].values[0] == "redthing"
    assert ds["label"].values[1] == "bluething"
    assert ds["label_iou"].values[0] >= 0.9
    assert ds["label_iou"].values[1] >= 0.9
    assert ds["threshold"].values[0] == pytest.approx(0.5)
    assert bool(ds["detector"].values[0]) and bool(ds["detector"].values[1])
    assert ds["category"].values[0] == "object"
    # top images of the red unit are exactly the images with a red square
    assert set(ds["top_index"].values[0]) <= {0, 1, 2, 3}
    assert set(ds["top_index"].values[1]) <= {4, 5, 6, 7}


def test_iou_equals_brute_force(dissected) -> None:
    model, results, _ = dissected
    source = Planted()
    images = torch.stack([source[i]["image"] for i in range(N)])
    for layer, acts in (("1", as_dissected(model[:2], images)), ("2", as_dissected(model, images))):
        ds = results[layer]
        maps = F.interpolate(acts, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        thr = torch.as_tensor(ds["threshold"].values)
        masks = (maps >= thr[None, :, None, None]).numpy()
        expected = brute_force_iou(masks, source)
        for cid, column in expected.items():
            got = ds["iou"].sel(concept=cid).values
            np.testing.assert_allclose(got, column, rtol=1e-6, atol=1e-9, err_msg=f"{layer} {cid}")


def test_thresholds_are_top_quantiles(dissected) -> None:
    model, results, _ = dissected
    source = Planted()
    images = torch.stack([source[i]["image"] for i in range(N)])
    with torch.no_grad():
        acts = model[:2](images).permute(1, 0, 2, 3).reshape(3, -1).numpy()
    exact = np.quantile(acts, 0.995, axis=1, method="inverted_cdf")
    np.testing.assert_allclose(results["1"]["threshold"].values, exact, rtol=1e-3, atol=2e-3)


def test_written_results(dissected) -> None:
    _, results, out = dissected
    doc = json.loads((out / "results.json").read_text())
    unit0 = doc["layers"]["1"]["units"][0]
    assert unit0["label"] == "redthing" and unit0["category"] == "object"
    assert unit0["iou"] == pytest.approx(float(results["1"]["label_iou"].values[0]))
    back = load_results(out)
    np.testing.assert_array_equal(back["2"]["iou"].values, results["2"]["iou"].values)
    assert back["1"]["top_image"].shape == (3, 3, 32, 32, 3)
    masks = back["1"]["top_mask"].values[0]
    assert masks.any() and masks.mean() < 0.2


def test_resume_after_kill_equals_uninterrupted(tmp_path: Path, dissected, monkeypatch) -> None:
    """Kill pass 2 midway (an exception in the tally); rerunning resumes to the same result."""
    from nethook.stats import iou as iou_module

    _, reference, _ = dissected
    real_update = iou_module.IoU.update_flat  # the CPU path tallies the masks' on entries
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second batch each process tallies (of three)
            raise KeyboardInterrupt("killed")
        return real_update(self, *args, **kwargs)

    monkeypatch.setattr(iou_module.IoU, "update_flat", flaky)
    mode = reference["1"].attrs["pass2"]
    kwargs = dict(
        out=tmp_path,
        batch_size=7,
        topk=3,
        progress=False,
        checkpoint_every=1,
        pass2=mode,
        parallel=2,
    )
    with pytest.raises(KeyboardInterrupt):
        dissect(planted_model(), ["1", "2"], Planted(), **kwargs)
    if mode == "recompute":  # each process checkpoints its part (from the log: none)
        assert (tmp_path / "checkpoints" / "pass2.0of2.npz").exists()
    else:
        assert any((tmp_path / "checkpoints" / "pass1.log").glob("*.safetensors"))
    monkeypatch.setattr(iou_module.IoU, "update_flat", real_update)
    resumed = dissect(planted_model(), ["1", "2"], Planted(), **kwargs)
    for layer in ("1", "2"):
        np.testing.assert_array_equal(resumed[layer]["iou"].values, reference[layer]["iou"].values)


def test_killed_pass1_with_store_resumes(tmp_path: Path, dissected, monkeypatch) -> None:
    """Kill pass 1 midway (log half written); the rerun resumes, then drops the log."""
    from nethook.stats import top_quantile as quantile_module

    _, reference, _ = dissected
    if reference["1"].attrs["pass2"] != "store":
        pytest.skip("the store path only")
    real_update = quantile_module.TopQuantile.update
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 * 2 + 1:  # two layers: each process's third batch (of three)
            raise KeyboardInterrupt("killed")
        return real_update(self, *args, **kwargs)

    monkeypatch.setattr(quantile_module.TopQuantile, "update", flaky)
    kwargs = dict(
        out=tmp_path, batch_size=7, topk=3, progress=False, checkpoint_every=2, parallel=2
    )
    with pytest.raises(KeyboardInterrupt):
        dissect(planted_model(), ["1", "2"], Planted(), **kwargs)
    store = tmp_path / "checkpoints" / "pass1.log"
    assert (tmp_path / "checkpoints" / "pass1.0of2.npz").exists()
    monkeypatch.setattr(quantile_module.TopQuantile, "update", real_update)
    resumed = dissect(planted_model(), ["1", "2"], Planted(), **kwargs)
    assert not store.exists()
    for layer in ("1", "2"):
        for name in ("iou", "threshold", "top_index", "top_image", "top_mask"):
            np.testing.assert_array_equal(
                resumed[layer][name].values, reference[layer][name].values
            )


@pytest.mark.parametrize("rotate", [None, 0.5])
def test_store_and_recompute_paths_agree(rotate) -> None:
    """Masks rebuilt from the cells pass 1 kept equal those of running the model again."""
    kwargs = dict(batch_size=7, topk=3, progress=False, rotate=rotate)
    again = dissect(planted_model(), ["1", "2"], Planted(), pass2="recompute", **kwargs)
    kept = dissect(planted_model(), ["1", "2"], Planted(), pass2="store", **kwargs)
    for layer in ("1", "2"):
        for name in ("iou", "threshold", "label", "top_index", "top_image", "top_mask"):
            np.testing.assert_array_equal(kept[layer][name].values, again[layer][name].values)


def test_pass1_keeps_a_small_share_of_the_activations(tmp_path: Path, monkeypatch) -> None:
    """The log holds the cells above the floor (and neighbours): far fewer than all."""
    from safetensors.numpy import load_file

    from nethook.batchlog import BatchLog

    removed = []
    monkeypatch.setattr(BatchLog, "remove", lambda self: removed.append(self.path))
    monkeypatch.setattr("nethook.dissect._rmtree", lambda path: removed.append(path))
    model = planted_model()
    dissect(model, ["1", "2"], Planted(), out=tmp_path, batch_size=16, progress=False)
    log = tmp_path / "checkpoints" / "pass1.log"
    images = torch.stack([Planted()[i]["image"] for i in range(N)])
    with torch.no_grad():
        total = model[:2](images).numel() + model(images).numel()
    files = sorted(log.glob("*.safetensors"))
    kept = sum(len(load_file(str(f))[f"value{i}"]) for f in files for i in (0, 1))
    assert len(files) == -(-N // 16)
    assert 0 < kept < 0.35 * total
    assert removed == [log]


def test_sparse_and_dense_masks_give_the_same_tallies(monkeypatch) -> None:
    """On-entries around hot cells (CPU) and dense upsampled masks (accelerators) agree."""
    from nethook import dissect as dissect_module

    kwargs = dict(batch_size=7, progress=False, gallery_size=None, rotate=0.5)
    sparse = dissect(planted_model(), ["1", "2"], Planted(), **kwargs)
    monkeypatch.setattr(dissect_module._IoUTally, "dense", True)
    dense = dissect(planted_model(), ["1", "2"], Planted(), **kwargs)
    for layer in ("1", "2"):
        np.testing.assert_allclose(
            sparse[layer]["iou"].values, dense[layer]["iou"].values, atol=1e-6
        )


def test_thresholds_have_the_exact_top_share() -> None:
    """Each unit's threshold leaves the top 0.5% of all its positions at or above it.

    Unit 2 of layer "1" is continuous (grey noise): counted over every position of
    every image, the share at or above its threshold is 0.005 within the sketch's
    stated rank-error bound (about 1e-4 here), plus one value for the inverted-CDF
    definition.
    """
    model = planted_model()
    images = torch.stack([Planted()[i]["image"] for i in range(N)])
    with torch.no_grad():
        grey = model[:2](images)[:, 2].reshape(-1).numpy()
    ds = dissect(model, "1", Planted(), progress=False, gallery_size=None, topk=1)["1"]
    threshold = float(ds["threshold"].values[2])
    top_share = float((grey >= threshold).mean())
    assert abs(top_share - 0.005) <= 2e-4 + 1 / grey.size
    assert float((grey > threshold).mean()) < 0.005 + 2e-4


def test_rotation_equals_dissecting_a_rotated_layer() -> None:
    """--rotate ALPHA measures the layer in the basis Q**alpha: same as a 1x1 conv by Q**alpha."""
    from nethook.rotation import fractional_rotation, random_rotation

    exact = dict(progress=False, gallery_size=None)
    rotated = dissect(planted_model(), "1", Planted(), rotate=0.5, seed=3, **exact)["1"]
    q = torch.from_numpy(fractional_rotation(random_rotation(3, 3), 0.5)).float()
    conv = nn.Conv2d(3, 3, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(q.view(3, 3, 1, 1))
    explicit = nn.Sequential(*planted_model()[:2], conv).eval()
    reference = dissect(explicit, "2", Planted(), **exact)["2"]
    assert rotated.attrs["rotate"] == 0.5
    np.testing.assert_allclose(rotated["threshold"], reference["threshold"], rtol=1e-5)
    np.testing.assert_allclose(rotated["iou"], reference["iou"], atol=1e-3)


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="quantile"):
        dissect(planted_model(), "1", Planted(), quantile=0.7, progress=False)
    with pytest.raises(ValueError, match="rotate"):
        dissect(planted_model(), "1", Planted(), rotate=2.0, progress=False)
    with pytest.raises(ValueError, match="pass2"):
        dissect(planted_model(), "1", Planted(), pass2="disk", progress=False)
    with pytest.raises(Exception, match="nolayer"):
        dissect(planted_model(), "nolayer", Planted(), progress=False)


def test_split_over_processes_agrees_with_one_process() -> None:
    """Two processes (every other batch each, merged) find what one process finds."""
    kwargs = dict(batch_size=7, topk=3, progress=False)
    one = dissect(planted_model(), ["1", "2"], Planted(), parallel=1, **kwargs)
    two = dissect(planted_model(), ["1", "2"], Planted(), parallel=2, **kwargs)
    for layer in ("1", "2"):
        detectors = one[layer]["detector"].values  # the noise unit's best IoUs are near ties
        assert detectors.sum() == 2
        np.testing.assert_array_equal(two[layer]["detector"].values, detectors)
        np.testing.assert_array_equal(
            two[layer]["label"].values[detectors], one[layer]["label"].values[detectors]
        )
        np.testing.assert_array_equal(
            two[layer]["top_index"].values, one[layer]["top_index"].values
        )
        np.testing.assert_allclose(
            two[layer]["threshold"].values, one[layer]["threshold"].values, rtol=2e-3
        )
        np.testing.assert_allclose(two[layer]["iou"].values, one[layer]["iou"].values, atol=2e-3)


def test_bad_parallel_is_named() -> None:
    from nethook.dissect import _processes

    with pytest.raises(ValueError, match="parallel"):
        dissect(planted_model(), "1", Planted(), parallel=0, progress=False)
    with pytest.raises(ValueError, match="num_workers"):
        dissect(planted_model(), "1", Planted(), parallel=2, num_workers=1, progress=False)
    with pytest.raises(ValueError, match="accelerator"):
        _processes(2, on_cpu=False, num_workers=0, batches=10)
    assert _processes(None, on_cpu=False, num_workers=0, batches=10) == 1
    assert _processes(None, on_cpu=True, num_workers=2, batches=10) == 1
    assert _processes(4, on_cpu=True, num_workers=0, batches=3) == 3  # at most one per batch


def test_broden_fixture_end_to_end(tmp_path: Path) -> None:
    """The Broden reader, a planted red detector and the full pipeline, checked by hand.

    The fixture's images are 32 px with 16 px segmentations; a 1x1 conv unit fires on
    red (cars in street scenes, stripes in texture images). Its maps are sampled at the
    label pixels' centres, which for a factor of 2 is a 2x2 average.
    """
    from nethook.plugins import get_source
    from tests.plugins.broden_fixture import make_broden

    root = make_broden(tmp_path, n_images=9, size=32, seg_size=16)
    source = get_source(f"broden:{root}")
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in source.normalization)
    conv = nn.Conv2d(3, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, -1, -1], [-1, 1, -1]]).view(2, 3, 1, 1))
        conv.bias.copy_(torch.tensor([-3.5, -2.0]))
    model = nn.Sequential(conv, nn.ReLU()).eval()
    out = tmp_path / "out"
    results = dissect(model, "1", f"broden:{root}", out=out, quantile=0.15, progress=False)
    ds = results["1"]
    # unit 0 fires on every red pixel; its top 15% are mostly the (red) cars
    assert ds["label"].values[0] == "car" and ds["category"].values[0] == "object"
    assert ds["iou"].sel(concept=2).values[0] > 0.4  # red-c
    assert ds["label"].values[1] in ("green-c", "tree")

    table = source.concepts()
    category_of = dict(zip(table["id"], table["category"], strict=True))
    items = [source[i] for i in range(len(source))]
    images = torch.stack([(it["image"] - mean) / std for it in items])
    with torch.no_grad():
        maps = F.avg_pool2d(model(images), 2)
    masks = (maps >= torch.as_tensor(ds["threshold"].values)[None, :, None, None]).numpy()
    for cid in table["id"]:
        inter = np.zeros(2)
        union = np.zeros(2)
        for i, it in enumerate(items):
            dense = torch.cat(list(it["labels"].values())).numpy()
            whole = torch.cat(list(it["image_labels"].values())).numpy()
            present = {int(v) for v in np.unique(dense)} | {int(v) for v in whole}
            if not any(category_of.get(v) == category_of[cid] for v in present):
                continue
            concept = (dense == cid).any(0) | (cid in whole)
            inter += (masks[i] & concept).sum((1, 2))
            union += (masks[i] | concept).sum((1, 2))
        expected = np.divide(inter, union, out=np.zeros(2), where=union > 0)
        np.testing.assert_allclose(ds["iou"].sel(concept=cid).values, expected, rtol=1e-6)
    doc = json.loads((out / "results.json").read_text())
    assert doc["layers"]["1"]["units"][0]["label"] == "car"


def test_dissect_command_on_broden(tmp_path: Path, capsys) -> None:
    from nethook.cli import main
    from tests.plugins.broden_fixture import make_broden

    root = make_broden(tmp_path, n_images=6, size=32, seg_size=16)
    model_file = tmp_path / "planted.py"
    model_file.write_text(
        "from tests.test_dissect import planted_model\n\ndef build():\n    return planted_model()\n"
    )
    out = tmp_path / "out"
    argv = [
        "dissect",
        "--model",
        f"{model_file}:build",
        "--layers",
        "[12]",  # a glob: both modules "1" and "2"
        "--source",
        f"broden:{root}",
        "--out",
        str(out),
        "--rotate-sweep",
        "0,1",
        "--sweep-samples",
        "6",
        "--quiet",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "layer" in printed and "detectors" in printed
    sweep = pd.read_csv(out / "rotation.csv", dtype={"layer": str})
    assert sorted(sweep["alpha"].unique()) == [0.0, 1.0] and set(sweep["layer"]) == {"1", "2"}
    assert (out / "img" / "rotation.png").is_file()
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["layers"]) == {"1", "2"}


def test_dissect_command_pass2_modes_agree(tmp_path: Path) -> None:
    from nethook.cli import main
    from tests.plugins.broden_fixture import make_broden

    root = make_broden(tmp_path, n_images=6, size=32, seg_size=16)
    model_file = tmp_path / "planted.py"
    model_file.write_text(
        "from tests.test_dissect import planted_model\n\ndef build():\n    return planted_model()\n"
    )
    docs = {}
    for mode, extra in (("store", []), ("recompute", [])):
        out = tmp_path / mode
        argv = ["dissect", "--model", f"{model_file}:build", "--layers", "1,2"]
        argv += ["--source", f"broden:{root}", "--out", str(out), "--no-report", "--quiet"]
        argv += ["--pass2", mode, *extra]
        assert main(argv) == 0
        docs[mode] = json.loads((out / "results.json").read_text())
    assert docs["store"] == docs["recompute"]
    assert max(u["iou"] for u in docs["store"]["layers"]["1"]["units"]) > 0


def test_checkpoints_of_another_run_are_discarded(tmp_path: Path) -> None:
    """Leftovers of another run (another key, older layout) in OUT/checkpoints neither
    block the run nor leak into it."""
    from nethook.runner import save_checkpoint

    kwargs = dict(batch_size=7, topk=3, progress=False, gallery_size=None)
    reference = dissect(planted_model(), ["1"], Planted(), **kwargs)
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    for name in ("pass1.npz", "pass2.npz"):
        stale = {"consumers": ["iou"], "key": "another run", "batch_size": 7}
        save_checkpoint(checkpoints / name, {"meta": stale, "batches_done": 6, "states": {}})
    got = dissect(planted_model(), ["1"], Planted(), out=tmp_path, **kwargs)
    np.testing.assert_array_equal(got["1"]["iou"].values, reference["1"]["iou"].values)
