"""Layer views, reversible edits, composition, persistence and refusals."""

import pytest
import torch
from torch import nn

from nethook.rewrite import Edit, LinearMemory, insert


def second_moment(keys: torch.Tensor) -> torch.Tensor:
    return keys.T.double() @ keys.double() / keys.shape[0]


def test_conv_transpose_view_is_the_output_patch_of_one_input_location():
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(5, 3, kernel_size=3, bias=False)
    k = torch.randn(5)
    x = torch.zeros(1, 5, 1, 1)
    x[0, :, 0, 0] = k
    patch = layer(x)[0]  # [3, 3, 3]
    mem = LinearMemory(layer)
    assert mem.shape == (27, 5)
    assert torch.allclose(mem.matrix() @ k, patch.permute(0, 1, 2).reshape(-1), atol=1e-6)


def test_conv2d_view_maps_one_input_location_to_its_flipped_output_patch():
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 2, kernel_size=3, padding=1, bias=False)
    k = torch.randn(4)
    x = torch.zeros(1, 4, 5, 5)
    x[0, :, 2, 2] = k
    out = layer(x)[0, :, 1:4, 1:4].flip(-1).flip(-2)
    assert torch.allclose(LinearMemory(layer).matrix() @ k, out.reshape(-1), atol=1e-6)


@pytest.mark.parametrize(
    "layer",
    [nn.Linear(6, 4), nn.Conv2d(6, 4, 3), nn.ConvTranspose2d(6, 4, 2)],
    ids=["linear", "conv2d", "convT"],
)
def test_insert_apply_and_revert_bit_for_bit(layer):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Identity(), layer)
    mem = LinearMemory(layer)
    keys = torch.randn(200, 6)
    C = second_moment(keys)
    k_star, v_star = torch.randn(6), torch.randn(mem.values_dim)
    before = layer.weight.detach().clone()
    edit = insert(model, "1", k_star, v_star, C)
    assert torch.equal(layer.weight, before)  # insert computes, apply changes
    edit.apply(model)
    assert torch.allclose(mem.matrix() @ k_star, v_star, atol=1e-4)
    change = _as_memory(layer, (layer.weight.detach() - before).double())
    singular = torch.linalg.svdvals(change)
    assert singular[1] < 1e-5 * singular[0]  # rank one up to float32 rounding of W
    assert torch.linalg.matrix_rank(_as_memory(layer, edit.delta(model))) == 1
    edit.revert(model)
    assert torch.equal(layer.weight, before)


def _as_memory(layer, weight_delta):
    probe = LinearMemory(layer)
    saved = layer.weight.data
    layer.weight.data = weight_delta
    try:
        return probe.matrix().clone()
    finally:
        layer.weight.data = saved


def test_edits_compose_and_revert_in_any_order():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 5))
    base = model[0].weight.detach().clone()
    C = second_moment(torch.randn(500, 8))
    a = insert(model, "0", torch.randn(8), torch.randn(5), C)
    b = insert(model, "0", torch.randn(8), torch.randn(5), C)
    a.apply(model)
    b.apply(model)
    ab = model[0].weight.detach().clone()
    a.revert(model)
    b.revert(model)
    assert torch.equal(model[0].weight, base)
    b.apply(model)
    a.apply(model)
    assert torch.equal(model[0].weight, ab)  # order does not matter, bit for bit
    b.revert(model)
    only_a = model[0].weight.detach().clone()
    a.revert(model)
    a.apply(model)
    assert torch.equal(model[0].weight, only_a)
    a.revert(model)
    assert torch.equal(model[0].weight, base)


def test_save_load_round_trip_and_refusal_on_other_weights(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 3))
    C = second_moment(torch.randn(100, 4))
    edit = insert(model, "0", torch.randn(2, 4), torch.randn(2, 3), C)
    path = edit.save(tmp_path / "edit.safetensors")
    loaded = Edit.load(path)
    assert torch.equal(loaded.lam, edit.lam) and torch.equal(loaded.directions, edit.directions)
    assert loaded.layer == "0" and loaded.base_hash == edit.base_hash and loaded.rank == 2
    other = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="refusing to apply"):
        loaded.apply(other)
    loaded.apply(model)
    with pytest.raises(ValueError, match="already applied"):
        loaded.apply(model)


def test_bad_inputs_name_what_was_expected():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    C = torch.eye(4, dtype=torch.float64)
    with pytest.raises(TypeError, match="ReLU has no single linear map"):
        insert(model, "1", torch.randn(4), torch.randn(3), C)
    with pytest.raises(ValueError, match=r"keys must be \[t, 4\]"):
        insert(model, "0", torch.randn(5), torch.randn(3), C)
    with pytest.raises(ValueError, match=r"C is 3 x 3"):
        insert(model, "0", torch.randn(4), torch.randn(3), torch.eye(3, dtype=torch.float64))
    named = nn.Sequential()
    named.add_module("proj", nn.Linear(4, 3))
    with pytest.raises(LookupError, match="closest: 'proj'"):
        insert(named, "prj", torch.randn(4), torch.randn(3), C)


def test_optimize_and_pgd_reach_the_target_through_a_nonlinearity():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 4))
    C = second_moment(torch.randn(300, 6))
    k = torch.randn(6)
    target = torch.sigmoid(torch.tensor([2.0, -2.0, 1.0, 0.0]))
    for method in ("optimize", "pgd"):
        edit = insert(
            model, "0", k, target, C, method=method, head=torch.sigmoid, steps=400, lr=0.05
        )
        assert edit.rank == 1
        edit.apply(model)
        out = torch.sigmoid(model[0].weight @ k)
        assert torch.allclose(out, target, atol=2e-2), method
        edit.revert(model)


def test_keys_at_mask_locations_resized_to_the_layer_grid_and_weighted():
    layer = nn.Conv2d(3, 2, 1)
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[1, 2:, :2] = True  # the bottom-left quarter of image 1 = grid cell (1, 0)
    keys = LinearMemory(layer).keys(x, where=mask)
    assert torch.equal(keys, x[1, :, 1, 0][None])
    weights = torch.zeros(2, 2, 2)
    weights[0, 0, 1] = 0.5
    weighted = LinearMemory(layer).keys(x, where=weights)
    assert torch.equal(weighted, 0.5 * x[0, :, 0, 1][None])
    tokens = LinearMemory(nn.Linear(3, 2)).keys(torch.randn(2, 4, 3), where=torch.eye(2, 4).bool())
    assert tokens.shape == (2, 3)
    with pytest.raises(ValueError, match="location mask has 3 entries for 8"):
        LinearMemory(nn.Linear(3, 2)).keys(torch.randn(2, 4, 3), where=torch.ones(3).bool())
