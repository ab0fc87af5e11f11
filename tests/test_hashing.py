"""Content hashes: stable, sensitive to every part, type-tagged."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nethook.hashing import content_key, hash_model
from nethook.stats.moments import Mean


def small_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())


def test_model_hash_is_content_not_identity():
    a, b = small_net(0), small_net(0)
    assert hash_model(a) == hash_model(b)
    assert len(hash_model(a)) == 64


def test_model_hash_changes_with_one_weight_or_buffer():
    net = small_net()
    before = hash_model(net)
    with torch.no_grad():
        net[0].weight[0, 0, 0, 0] += 1e-6
    after_weight = hash_model(net)
    assert after_weight != before
    net[1].running_mean[2] = 0.5
    assert hash_model(net) != after_weight


def test_model_hash_sees_architecture_and_ignores_requires_grad():
    net = small_net()
    other = small_net()
    other[2] = torch.nn.Tanh()  # same weights, different function
    assert hash_model(net) != hash_model(other)
    h = hash_model(net)
    for p in net.parameters():
        p.requires_grad_(False)
    assert hash_model(net) == h


def test_model_hash_covers_exotic_dtypes():
    net = small_net().to(torch.bfloat16)
    assert hash_model(net) != hash_model(small_net())


def test_model_hash_refuses_non_modules():
    with pytest.raises(TypeError, match="expects a torch.nn.Module, got dict"):
        hash_model({})


def test_content_key_is_order_independent_and_stable_across_processes():
    parts = dict(layer="layer3", samples=1000, seed=0, qs=[0.5, 0.99], extra={"b": 1, "a": None})
    key = content_key(**parts)
    assert key == content_key(**dict(reversed(parts.items())))
    code = (
        "from nethook.hashing import content_key;"
        "print(content_key(layer='layer3', samples=1000, seed=0, qs=[0.5, 0.99],"
        " extra={'a': None, 'b': 1}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == key


@pytest.mark.parametrize(
    "a, b",
    [
        (1, 1.0),
        (1, True),
        (1, "1"),
        ([1, 2], (1, 2)),
        ([1, 2], [2, 1]),
        (0.1, 0.1 + 1e-17 + 2**-55),
        ("ab", ["a", "b"]),
        (None, "None"),
        (np.zeros(3, np.float32), np.zeros(3, np.float64)),
        (np.zeros((2, 3)), np.zeros((3, 2))),
        (torch.zeros(3), np.zeros(3, np.float32)),
        ({"a": 1}, {"a": 2}),
        (Path("x"), "x"),
    ],
)
def test_content_key_distinguishes(a, b):
    assert content_key(x=a) != content_key(x=b)
    assert content_key(x=a) == content_key(x=a)


def test_content_key_hashes_tensors_arrays_models_stats_and_fingerprints():
    t = torch.arange(6.0).reshape(2, 3)
    assert content_key(x=t) == content_key(x=t.T.contiguous().T)
    assert content_key(x=t) != content_key(x=t + 1)
    assert content_key(a=np.arange(4)) == content_key(a=np.arange(4).astype(">i8"))
    assert content_key(m=small_net(0)) != content_key(m=small_net(1))
    s1, s2 = Mean(), Mean()
    s1.update(torch.ones(2, 2))
    s2.update(torch.zeros(2, 2))
    assert content_key(s=s1) != content_key(s=s2)

    class Source:
        def __init__(self, n):
            self.n = n

        def fingerprint(self):
            return f"n={self.n}"

    assert content_key(src=Source(1)) == content_key(src=Source(1))
    assert content_key(src=Source(1)) != content_key(src=Source(2))
    assert content_key(key=float("nan")) == content_key(key=float("nan"))


def test_content_key_names_the_unhashable_part():
    with pytest.raises(TypeError, match=r"content_key\['cfg'\]\['fn'\]: cannot hash a function"):
        content_key(cfg={"fn": lambda: 0})
    with pytest.raises(TypeError, match="dtype object"):
        content_key(a=np.array([object()]))
