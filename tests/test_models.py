"""load_model: torchvision specs, import paths, files, weights from disk, clear errors."""

from __future__ import annotations

import textwrap

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import nethook
from nethook.models import load_model, parse_spec

FACTORY_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn

    CALLS = []


    def build(width=3, bias=True):
        CALLS.append(width)
        return nn.Sequential(nn.Linear(2, width, bias=bias), nn.ReLU())


    class Builder:
        @staticmethod
        def make():
            return nn.Linear(1, 1)


    INSTANCE = nn.Linear(4, 4)


    def not_a_model():
        return "model"
    """
)


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "my_models.py"
    path.write_text(FACTORY_SOURCE)
    return path


def same_parameters(a: nn.Module, b: nn.Module) -> bool:
    return all(
        torch.equal(p, q)
        for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_torchvision_random_init_in_eval_mode():
    model = nethook.load_model("torchvision:resnet18")
    assert type(model).__name__ == "ResNet" and not model.training
    assert model.fc.out_features == 1000
    model = load_model("torchvision:resnet18:num_classes=7")
    assert model.fc.out_features == 7


def test_torchvision_weights_from_a_file(tmp_path):
    torch.manual_seed(1)
    source = load_model("torchvision:resnet18:num_classes=5")
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    loaded = load_model("torchvision:resnet18:num_classes=5", weights=path)
    assert same_parameters(loaded, source)
    fresh = load_model("torchvision:resnet18:num_classes=5")
    assert not same_parameters(fresh, source)


def test_checkpoint_dicts_and_safetensors(tmp_path):
    source = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}
    torch.save(wrapped, tmp_path / "ckpt.pt")
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    (tmp_path / "arch.py").write_text(FACTORY_SOURCE)
    for name in ("ckpt.pt", "w.safetensors"):
        model = load_model(f"{tmp_path / 'arch.py'}:build", weights=tmp_path / name)
        assert same_parameters(model, source)


def test_pretrained_spec_without_a_file_says_how_to_provide_one():
    with pytest.raises(ValueError) as info:
        load_model("torchvision:resnet18:IMAGENET1K_V1")
    message = str(info.value)
    assert "download" in message and "--weights" in message and "weights='FILE.pth'" in message
    assert "https://download.pytorch.org/models/resnet18" in message
    with pytest.raises(ValueError, match="download"):
        load_model("torchvision:resnet18:pretrained=true")


def test_package_module_factory(tmp_path, factory_file, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    model = load_model("my_models:build:width=5,bias=false")
    assert model[0].out_features == 5 and model[0].bias is None
    assert isinstance(load_model("my_models:Builder.make"), nn.Linear)
    import my_models

    assert load_model("my_models:INSTANCE") is my_models.INSTANCE


def test_python_file_factory(factory_file):
    model = load_model(f"{factory_file}:build:width=4")
    assert model[0].out_features == 4
    assert not model.training


def test_specs_are_never_evaluated(tmp_path):
    marker = tmp_path / "evaluated"
    with pytest.raises(ValueError):
        load_model(f"__import__('pathlib').Path('{marker}').touch():x")
    assert not marker.exists()


@pytest.mark.parametrize(
    "spec, error, pattern",
    [
        ("resnet18", ValueError, "has no ':'"),
        ("torchvision:", ValueError, "names no factory"),
        ("torchvision:resnet81", ValueError, "closest: resnet18"),
        ("no_such_package_xyz:build", ValueError, "cannot import module 'no_such_package_xyz'"),
        ("/nonexistent/dir/m.py:build", FileNotFoundError, "no such file"),
        ("torchvision:resnet18:num_classes", ValueError, "neither a weights name"),
        ("torchvision:resnet18:num_classes=1,x", ValueError, "expected keyword arguments"),
    ],
)
def test_bad_specs_are_named(spec, error, pattern):
    with pytest.raises(error, match=pattern):
        load_model(spec)


def test_bad_factories_and_weights(factory_file, tmp_path):
    with pytest.raises(TypeError, match="built a str, not an nn.Module"):
        load_model(f"{factory_file}:not_a_model")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        load_model(f"{factory_file}:missing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(f"{factory_file}:build", weights=tmp_path / "none.pt")
    torch.save(nn.Linear(9, 9).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="does not fit"):
        load_model(f"{factory_file}:build", weights=tmp_path / "other.pt")
    torch.save({"0.weight": torch.zeros(3, 2)}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="missing 0.bias"):
        load_model(f"{factory_file}:build", weights=tmp_path / "partial.pt")


def test_weights_only_refuses_pickled_code(factory_file, tmp_path):
    torch.save({"0.weight": torch.zeros(3, 2), "hook": print}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_model(f"{factory_file}:build", weights=tmp_path / "evil.pt")


def test_parse_spec():
    assert parse_spec("torchvision:resnet18") == ("torchvision", "resnet18", "")
    assert parse_spec("a/b.py:make:x=1") == ("a/b.py", "make", "x=1")
    assert parse_spec("pkg.mod:Cls.build") == ("pkg.mod", "Cls.build", "")


def test_backbone_weights_are_never_downloaded(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("load_model tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    model = load_model("torchvision:lraspp_mobilenet_v3_large:num_classes=2")
    assert model.classifier.low_classifier.out_channels == 2


def test_model_device_from_parameters_then_buffers() -> None:
    import torch
    from torch import nn

    from nethook.models import model_device

    assert model_device(nn.Linear(2, 2).to(torch.float64)) == torch.device("cpu")
    buffers_only = nn.Module()
    buffers_only.register_buffer("scale", torch.ones(1, device="meta"))
    assert model_device(buffers_only) == torch.device("meta")
    assert model_device(nn.ReLU()) == torch.device("cpu")
