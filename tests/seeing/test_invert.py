"""Layer-wise inversion: recovery on a small random generator, resumable training, bad input."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from nethook.invert import (
    Chain,
    FeatureNet,
    TrainSettings,
    correlation,
    encode,
    inversion_correlations,
    invert,
    omission_page,
    pooled_correlation,
    rich_in,
    ship_encoder,
    shipped_settings,
    train_encoder,
)

from .planted import ColorSegmenter, StripeSource
from .toy import ToyGenerator

torch.set_num_threads(1)

FAST = TrainSettings(steps=150, joint_steps=150, batch_size=16, hidden=32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    generator = ToyGenerator(seed=0)
    ckpt = tmp_path_factory.mktemp("inverters")
    return generator, train_encoder(generator, settings=FAST, checkpoint_dir=ckpt, progress=False)


def test_full_method_recovers_r(trained):
    generator, encoder = trained
    chain = Chain(generator)
    with torch.no_grad():
        rs = chain.representations(chain.sample_z(8, seed=999))
    result = invert(generator, encoder, rs[-1], "layer1", lambda_v=0, steps=150)
    assert correlation(result.r, rs[1]).min() >= 0.99
    assert correlation(result.x, rs[-1]).min() >= 0.99
    alone = encode(generator, encoder, rs[-1], "layer1")
    assert correlation(result.r, rs[1]).mean() >= correlation(alone.r, rs[1]).mean()


def test_correlation_table_with_a_feature_network(trained):
    generator, encoder = trained
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3))
    features = FeatureNet(net, layer="1", size=None, mean=(0, 0, 0), std=(1, 1, 1))
    table = inversion_correlations(
        generator, encoder, "layer1", n=4, features=features, steps=60, z_steps=60
    )
    assert table.dims == ("approach", "quantity", "measure")
    assert list(table["approach"].values) == ["z_optimization", "encoder", "full", "full_z"]
    assert (table.sel(approach=["full", "full_z"], quantity="r") >= 0.99).all()


def test_correlation_is_pearson():
    a = torch.randn(3, 50, dtype=torch.float64)
    assert torch.allclose(correlation(a, 2 * a + 1), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(correlation(a, -a), -torch.ones(3, dtype=torch.float64))


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("stop_after", [3, 7, 10])
def test_resumed_training_equals_uninterrupted(tmp_path, stop_after):
    """Stop mid-stage (3), in a later stage (7) or mid joint phase (10), resume, compare."""
    generator = ToyGenerator(seed=1)
    small = TrainSettings(steps=4, joint_steps=4, batch_size=4, hidden=8)
    straight = train_encoder(generator, settings=small, progress=False)
    partial = train_encoder(generator, settings=small, checkpoint_dir=tmp_path, progress=False,
                            stop_after=stop_after, save_every=2)  # fmt: skip
    resumed = train_encoder(generator, settings=small, checkpoint_dir=tmp_path, progress=False)
    want = _params(straight)
    assert any(not torch.equal(want[k], v) for k, v in _params(partial).items())
    for k, v in _params(resumed).items():
        assert torch.equal(want[k], v), k


def test_checkpoints_are_keyed_by_generator_weights(tmp_path):
    small = TrainSettings(steps=2, joint_steps=2, batch_size=2, hidden=8)
    train_encoder(ToyGenerator(seed=1), settings=small, checkpoint_dir=tmp_path, progress=False)
    first = set(p.name for p in tmp_path.iterdir())
    assert len(first) == 4  # three stages and the joint encoder
    train_encoder(ToyGenerator(seed=2), settings=small, checkpoint_dir=tmp_path, progress=False)
    assert len(set(p.name for p in tmp_path.iterdir())) == 8


def test_wrong_image_size_names_both_sizes(trained):
    generator, encoder = trained
    with pytest.raises(ValueError, match=r"\(3, 32, 32\).*\(3, 16, 16\)"):
        invert(generator, encoder, torch.rand(1, 3, 32, 32), "layer1", lambda_v=0, steps=1)


def test_unknown_layer_names_the_stages(trained):
    generator, encoder = trained
    with pytest.raises(ValueError, match=r"'layer9'.*\['layer1', 'layer2', 'output'\]"):
        invert(generator, encoder, torch.rand(1, 3, 16, 16), "layer9", lambda_v=0, steps=1)


def test_rich_in_picks_images_with_most_of_the_class():
    source = StripeSource(30, seed=3)
    picked = rich_in(source, ColorSegmenter(), ["blue"], n=3, scan=30, batch_size=7)
    blue = [w[2] for w in source.widths]
    assert sorted(blue[i] for i in picked) == sorted(blue)[-3:]
    with pytest.raises(ValueError, match="purple"):
        rich_in(source, ColorSegmenter(), ["purple"])


def test_omission_page_has_four_columns(tmp_path):
    real = torch.rand(2, 3, 8, 8)
    index = omission_page(real, real.flip(-1), ColorSegmenter(), tmp_path)
    from PIL import Image

    width, height = Image.open(tmp_path / "img" / "omissions.png").size
    assert (width, height) == (4 * 8 * 16, 2 * 8 * 16)
    assert "segmentation of reconstruction" in index.read_text()


def test_cli_inverts_source_images(tmp_path, monkeypatch, capsys):
    from nethook.commands import invert as command

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {"image": torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(i))}

    monkeypatch.setattr("nethook.models.load_model", lambda spec, weights=None: ToyGenerator())
    monkeypatch.setattr("nethook.plugins.get_source", lambda spec: Images())
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    argv = ["invert", "--layer", "layer2", "--images", "x", "--out", str(tmp_path), "--n", "2",
            "--train-steps", "3", "--joint-steps", "2", "--steps", "3", "--features", "none",
            "--quiet"]  # fmt: skip
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    saved = torch.load(tmp_path / "inversion.pt")
    assert saved["r"].shape == (2, 8, 8, 8) and saved["reconstruction"].shape == (2, 3, 16, 16)
    assert "image 1:" in capsys.readouterr().out
    assert len(list((tmp_path / "inverters").iterdir())) == 4


def test_cli_refuses_wrong_size_before_training(tmp_path, monkeypatch, capsys):
    from nethook.commands import invert as command

    images = [{"image": torch.rand(3, 32, 32)}]
    monkeypatch.setattr("nethook.models.load_model", lambda spec, weights=None: ToyGenerator())
    monkeypatch.setattr("nethook.plugins.get_source", lambda spec: images)
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    args = parser.parse_args(["invert", "--layer", "layer1", "--images", "x", "--out",
                              str(tmp_path / "o"), "--n", "1", "--quiet"])  # fmt: skip
    assert args.func(args) == 2
    assert "(3, 32, 32)" in capsys.readouterr().err
    assert not (tmp_path / "o" / "inverters").exists()


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 4), size=st.integers(2, 30), seed=st.integers(0, 2**31 - 1))
def test_pooled_correlation_is_pearson_over_all_values(n, size, seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, size))
    b = 0.5 * a + rng.normal(size=(n, size)) + rng.normal(size=(n, 1))  # per-image offsets too
    want = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    got = pooled_correlation(torch.from_numpy(a), torch.from_numpy(b))
    assert got == pytest.approx(want, abs=1e-9)


def test_shipped_encoder_is_loaded_instead_of_training(tmp_path, monkeypatch):
    """A finished encoder saved by ship_encoder under its content key replaces training."""
    import nethook.invert as inv

    small = TrainSettings(steps=3, joint_steps=3, batch_size=2, hidden=8)
    trained = train_encoder(ToyGenerator(seed=1), settings=small, progress=False)
    path = ship_encoder(trained, ToyGenerator(seed=1), small, folder=tmp_path)
    assert path.stat().st_size < 5e6
    assert shipped_settings(ToyGenerator(seed=1), folder=tmp_path) == small
    assert shipped_settings(ToyGenerator(seed=2), folder=tmp_path) is None
    monkeypatch.setattr(inv, "SHIPPED", tmp_path)

    def no_training(*args, **kwargs):
        raise AssertionError("trained although a shipped encoder matches")

    monkeypatch.setattr(inv, "_train_loop", no_training)
    loaded = train_encoder(ToyGenerator(seed=1), settings=small, progress=False)
    for k, v in _params(loaded).items():
        torch.testing.assert_close(v, _params(trained)[k].half().float())
    with pytest.raises(AssertionError, match="trained although"):  # other weights: other key
        train_encoder(ToyGenerator(seed=2), settings=small, progress=False)


def test_refining_z_first_moves_z_towards_the_truth():
    """From a poor encoder (z0 uncorrelated with z), refining z first recovers it, r with it."""
    generator = ToyGenerator(seed=0)
    poor = train_encoder(generator, settings=TrainSettings(steps=5, joint_steps=5, batch_size=8,
                                                           hidden=16), progress=False)  # fmt: skip
    chain = Chain(generator)
    with torch.no_grad():
        rs = chain.representations(chain.sample_z(6, seed=321))
    kw = {"lambda_v": 0, "lambda_reg": 1e-3, "steps": 100, "lr": 0.03}
    plain = invert(generator, poor, rs[-1], "layer2", **kw)
    refined = invert(generator, poor, rs[-1], "layer2", z_steps=200, z_lr=0.1, **kw)
    z_true = rs[0].flatten(1)
    z_plain = pooled_correlation(plain.z.flatten(1), z_true)
    z_refined = pooled_correlation(refined.z.flatten(1), z_true)
    assert z_plain < 0.5 and z_refined > 0.9
    assert pooled_correlation(refined.r, rs[2]) >= 0.99


def test_per_stage_step_counts_must_match_the_stages():
    with pytest.raises(
        ValueError, match=r"2 step counts.*3 stages \['layer1', 'layer2', 'output'\]"
    ):
        train_encoder(ToyGenerator(), settings=TrainSettings(steps=(1, 1)), progress=False)


def test_cli_names_a_bad_train_steps_value(tmp_path, monkeypatch, capsys):
    from nethook.commands import invert as command

    monkeypatch.setattr("nethook.models.load_model", lambda spec, weights=None: ToyGenerator())
    monkeypatch.setattr(
        "nethook.plugins.get_source", lambda spec: [{"image": torch.rand(3, 16, 16)}]
    )
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    args = parser.parse_args(["invert", "--layer", "layer1", "--images", "x", "--out",
                              str(tmp_path), "--n", "1", "--train-steps", "3,x", "--quiet"])  # fmt: skip
    assert args.func(args) == 2
    assert (
        "--train-steps must be a number or comma-separated numbers, got '3,x'"
        in capsys.readouterr().err
    )


def test_the_demo_generator_ships_a_trained_encoder(monkeypatch):
    """scene_gan's encoder loads (weights_only) without training and beats chance on r."""
    import nethook.invert as inv
    from nethook.gan.generator import WEIGHTS, scene_gan

    if not WEIGHTS.is_file():
        pytest.skip("demo generator weights absent")
    generator = scene_gan()
    settings = shipped_settings(generator)
    assert settings is not None, "no shipped encoder matches scene_gan's weights: re-ship one"

    def no_training(*args, **kwargs):
        raise AssertionError("trained although the shipped encoder matches")

    monkeypatch.setattr(inv, "_train_loop", no_training)
    encoder = train_encoder(generator, settings=settings, progress=False)
    chain = Chain(generator)
    with torch.no_grad():
        rs = chain.representations(chain.sample_z(16, seed=10_001))
    got = encode(generator, encoder, rs[-1], "layer1")
    assert pooled_correlation(got.r, rs[1]) > 0.5
    assert pooled_correlation(got.x, rs[-1]) > 0.7
