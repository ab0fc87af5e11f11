"""A rank-one rule edit of a conv layer of the demo scene CNN, against fine-tuning."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from nethook.rewrite import LinearMemory, insert
from nethook.rewrite.keys import key_second_moment
from nethook.trace import Trace

LAYER = "block3.conv"
TREE = 12  # the scenes plugin's concept id of "tree" (checked below)


@pytest.fixture(scope="module")
def setup():
    from nethook_plugins.scenes.source import Scenes

    from nethook.demo.scene_cnn import scene_cnn

    source = Scenes(n=96, size=64, seed=3, progress=False)
    assert source.concepts().set_index("id").loc[TREE, "name"] == "tree"
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in source.normalization)
    items = [source[i] for i in range(len(source))]
    images = (torch.stack([it["image"] for it in items]) - mean) / std
    objects = torch.stack([it["labels"]["object"][0] for it in items])
    model = scene_cnn()
    C = key_second_moment(model, LAYER, TensorDataset(images[:64]), progress=False).moment()
    with torch.no_grad(), Trace(model, LAYER, retain_input=True, stop=True) as t:
        model(images)
    keys = t.input  # [N, 32, 16, 16]
    tree = nn.functional.adaptive_avg_pool2d((objects == TREE).float()[:, None], keys.shape[-2:])
    return model, C, keys, tree[:, 0] > 0.9


def test_rank_one_conv_edit_generalizes_in_context_and_spares_other_keys(setup):
    model, C, keys, tree = setup
    memory = LinearMemory(model.get_submodule(LAYER))
    flat = keys.permute(0, 2, 3, 1)  # [N, H, W, C]
    train_tree = flat[:64][tree[:64]]
    held_tree, held_other = flat[64:][tree[64:]], flat[64:][~tree[64:]]
    assert len(train_tree) > 20 and len(held_tree) > 5 and len(held_other) > 1000
    W0 = memory.matrix().double()
    k_star = train_tree.mean(0).double()
    v_star = W0 @ flat[:64][~tree[:64]][0].double()  # paste the value of a non-tree location

    edit = insert(model, LAYER, k_star, v_star, C.double(), context=train_tree, rank=1)
    edit.apply(model)
    ours = memory.matrix().double() - W0
    edit.revert(model)
    assert torch.allclose((W0 + ours) @ k_star, v_star, atol=1e-3 * v_star.norm())

    # baseline: gradient descent on the same weight without the direction constraint
    W = W0.clone().requires_grad_(True)
    opt = torch.optim.SGD([W], lr=0.5 / float(k_star @ k_star))
    for _ in range(200):
        loss = 0.5 * (W @ k_star - v_star).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    tuned = W.detach() - W0
    assert torch.allclose((W0 + tuned) @ k_star, v_star, atol=1e-3 * v_star.norm())

    def change(delta, k):
        return (k.double() @ delta.T).norm(dim=1).pow(2).mean() / (k.double() @ W0.T).norm(
            dim=1
        ).pow(2).mean()

    # held-out keys outside the context change less than under fine-tuning ...
    assert change(ours, held_other) < 0.5 * change(tuned, held_other)
    # ... and the new rule applies where context keys match (held-out tree locations)
    selectivity_ours = change(ours, held_tree) / change(ours, held_other)
    selectivity_tuned = change(tuned, held_tree) / change(tuned, held_other)
    assert selectivity_ours > 2 * selectivity_tuned
