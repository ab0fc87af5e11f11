"""Key statistics collected through the runner, and their content-keyed cache."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from nethook.rewrite.keys import key_second_moment, token_keys


def test_second_moment_of_linear_keys_equals_numpy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    x = torch.randn(100, 5)
    C = key_second_moment(model, "2", TensorDataset(x), batch_size=16, progress=False).moment()
    keys = torch.relu(model[0](x)).detach().double().numpy()
    assert np.allclose(C.numpy(), keys.T @ keys / len(keys), rtol=1e-6, atol=1e-9)


def test_conv_keys_are_every_location_of_the_input():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 3))
    x = torch.randn(6, 3, 5, 5)
    C = key_second_moment(model, "1", TensorDataset(x), batch_size=4, progress=False).moment()
    feats = model[0](x).detach().permute(0, 2, 3, 1).reshape(-1, 4).double().numpy()
    assert np.allclose(C.numpy(), feats.T @ feats / len(feats), rtol=1e-6, atol=1e-9)


def test_cache_is_reused_only_for_the_same_weights(tmp_path):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    data = TensorDataset(torch.randn(40, 4))
    path = tmp_path / "C.npz"
    first = key_second_moment(model, "1", data, cache=path, progress=False).moment()
    assert path.is_file()
    stamp = path.stat().st_mtime_ns
    again = key_second_moment(model, "1", data, cache=path, progress=False).moment()
    assert torch.equal(first, again) and path.stat().st_mtime_ns == stamp  # read, not rewritten
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    changed = key_second_moment(model, "1", data, cache=path, progress=False).moment()
    assert not torch.allclose(changed, first)  # new weights: recomputed, not the stale C


def test_token_keys_pick_the_input_at_each_position():
    emb = nn.Embedding(10, 6)
    model = nn.Sequential(emb, nn.Linear(6, 3))
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    keys = token_keys(model, "1", ids, torch.tensor([2, 0]))
    assert torch.equal(keys, torch.stack([emb.weight[3], emb.weight[4]]).detach())


def test_uncacheable_source_is_named():
    model = nn.Sequential(nn.Linear(2, 2))

    class Plain(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.ones(2)

    with pytest.raises(ValueError, match="Plain: it has no fingerprint"):
        key_second_moment(model, "0", Plain(), cache="unused.npz", progress=False)
