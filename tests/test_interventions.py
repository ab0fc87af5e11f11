"""Interventions change exactly the units and region they name, and round-trip through JSON."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from nethook import Trace, interventions
from nethook.interventions import (
    Ablate,
    AddDirection,
    Intervention,
    PartialAblate,
    PartialInsert,
    Replace,
    Scale,
    from_json,
)

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def conv_case(draw):
    """A conv-shaped output, a unit subset, an optional mask of 0/1 or fractions, and per-unit values."""
    b, c, h, w = (
        draw(st.integers(1, 3)),
        draw(st.integers(1, 6)),
        draw(st.integers(1, 4)),
        draw(st.integers(1, 4)),
    )
    units = draw(st.lists(st.integers(0, c - 1), min_size=1, max_size=c, unique=True))
    kind = draw(st.sampled_from(["none", "binary", "soft"]))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
    if kind == "none":
        mask = None
    elif kind == "binary":
        mask = (torch.rand(h, w, generator=gen) < 0.5).double()
    else:
        mask = torch.rand(h, w, generator=gen, dtype=torch.float64)
    alpha = torch.rand(len(units), generator=gen, dtype=torch.float64).tolist()
    values = (torch.randn(len(units), generator=gen, dtype=torch.float64) * 3).tolist()
    return x, units, mask, alpha, values


def expected_edit(x, units, mask, rule):
    """Apply ``rule(unit_index, r) -> new value`` unit by unit, blending with the mask by hand."""
    out = x.clone()
    m = torch.ones(x.shape[2:], dtype=x.dtype) if mask is None else mask
    for i, u in enumerate(units):
        r = x[:, u]
        out[:, u] = (1 - m) * r + m * rule(i, r)
    return out


def untouched(units, c):
    return [u for u in range(c) if u not in units]


@SETTINGS
@given(conv_case())
def test_ablate_zeroes_exactly_the_units_in_the_mask(case):
    x, units, mask, _, _ = case
    got = Ablate(units, mask=mask).apply(x)
    torch.testing.assert_close(got, expected_edit(x, units, mask, lambda i, r: 0 * r))
    others = untouched(units, x.shape[1])
    assert torch.equal(got[:, others], x[:, others])
    if mask is not None:
        assert torch.all(got[:, units][..., mask == 1] == 0)
        assert torch.equal(got[:, units][..., mask == 0], x[:, units][..., mask == 0])


@SETTINGS
@given(conv_case())
def test_replace_scale_and_add(case):
    x, units, mask, alpha, values = case
    got = Replace(units, values=values, mask=mask).apply(x)
    torch.testing.assert_close(
        got, expected_edit(x, units, mask, lambda i, r: torch.full_like(r, values[i]))
    )
    got = Scale(units, factor=values, mask=mask).apply(x)
    torch.testing.assert_close(got, expected_edit(x, units, mask, lambda i, r: values[i] * r))
    direction = torch.arange(x.shape[1], dtype=x.dtype) - 1.5
    got = AddDirection(direction=direction, scale=0.5, mask=mask).apply(x)
    all_units = list(range(x.shape[1]))
    want = expected_edit(x, all_units, mask, lambda i, r: r + 0.5 * direction[i])
    torch.testing.assert_close(got, want)


@SETTINGS
@given(conv_case())
def test_partial_ablation_and_insertion_follow_the_thesis(case):
    """GAN Dissection: ablation (1 - a p) r, insertion (1 - a p) r + a p k, p the mask."""
    x, units, mask, alpha, values = case
    p = torch.ones(x.shape[2:], dtype=x.dtype) if mask is None else mask
    got = PartialAblate(units, alpha=alpha, mask=mask).apply(x)
    got_insert = PartialInsert(units, values=values, alpha=alpha, mask=mask).apply(x)
    want = x.clone()
    want_insert = x.clone()
    for i, u in enumerate(units):
        ap = alpha[i] * p
        want[:, u] = (1 - ap) * x[:, u]
        want_insert[:, u] = (1 - ap) * x[:, u] + ap * values[i]
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_insert, want_insert)


@SETTINGS
@given(
    t=st.integers(1, 6),
    c=st.integers(1, 5),
    data=st.data(),
)
def test_token_positions_on_sequence_outputs(t, c, data):
    units = data.draw(st.lists(st.integers(0, c - 1), min_size=1, unique=True))
    positions = data.draw(st.lists(st.integers(0, t - 1), min_size=1, unique=True))
    x = torch.randn(2, t, c)
    got = Ablate(units, positions=positions).apply(x)
    for pos in range(t):
        for u in range(c):
            if pos in positions and u in units:
                assert torch.all(got[:, pos, u] == 0)
            else:
                assert torch.equal(got[:, pos, u], x[:, pos, u])


def test_vector_outputs_use_the_last_dim():
    x = torch.randn(4, 6)
    got = Scale([1, 4], factor=[2.0, -1.0]).apply(x)
    want = x.clone()
    want[:, 1] *= 2
    want[:, 4] *= -1
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(Ablate([0], channel_dim=0).apply(x)[0], torch.zeros(6))


def test_input_is_not_modified_and_grad_flows():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    before = x.detach().clone()
    Ablate([1]).apply(x).sum().backward()
    assert torch.equal(x.detach(), before)
    assert torch.all(x.grad[:, 1] == 0) and torch.all(x.grad[:, [0, 2]] == 1)


def test_intervention_as_edit_output_changes_the_downstream_result():
    """Unit 2 of the conv is the only one the readout sees; ablating it leaves the bias."""
    conv = nn.Conv2d(1, 4, 1)
    readout = nn.Linear(4, 1)
    with torch.no_grad():
        readout.weight.zero_()
        readout.weight[0, 2] = 1.0
        readout.bias.fill_(0.25)
    model = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), readout)
    x = torch.randn(3, 1, 5, 5)
    with torch.no_grad():
        assert not torch.allclose(model(x), torch.full((3, 1), 0.25))
        with Trace(model, "0", edit_output=Ablate([2])):
            y = model(x)
        torch.testing.assert_close(y, torch.full((3, 1), 0.25))
        with Trace(model, "0", edit_output=Ablate([0, 1, 3])):
            y = model(x)
        torch.testing.assert_close(y, model(x))


def test_tuple_outputs_edit_the_first_tensor_and_keep_the_rest():
    out = (torch.ones(2, 3, 4), None, torch.ones(1))
    got = Ablate([1])(out, "blocks.0")
    assert got[1] is None and got[2] is out[2]
    assert torch.all(got[0][..., 1] == 0) and torch.all(got[0][..., [0, 2, 3]] == 1)
    got = Ablate([0])({"hidden": torch.ones(2, 2), "other": torch.ones(2, 2)})
    assert torch.all(got["hidden"][:, 0] == 0) and torch.all(got["other"] == 1)


INSTANCES = [
    Ablate([3, 7]),
    Ablate([0], mask=[[0, 1], [1, 0.5]]),
    Replace([1, 2], values=[0.5, -2.0], positions=[0, 3]),
    Scale([5], factor=3.0),
    AddDirection(direction=[0.1, -0.2, 0.3], scale=2.0),
    PartialAblate([0, 1], alpha=[0.25, 1.0]),
    PartialInsert(list(range(20)), values=2.0, alpha=0.5, mask=[[1, 0]]),
]


@pytest.mark.parametrize("obj", INSTANCES, ids=lambda o: type(o).__name__)
def test_json_round_trip(obj):
    text = json.dumps(obj.to_json())
    back = from_json(json.loads(text))
    assert type(back) is type(obj) and back == obj
    x = torch.randn(2, 20, 2, 2) if obj.positions is None else torch.randn(2, 4, 20)
    if isinstance(obj, AddDirection):
        x = torch.randn(2, 3, 2, 2)
    if obj.mask is not None:
        x = torch.randn(2, 20, *torch.as_tensor(obj.mask).shape)
    torch.testing.assert_close(back.apply(x), obj.apply(x))


@SETTINGS
@given(
    units=st.lists(st.integers(0, 500), min_size=1, max_size=50, unique=True),
    alpha=st.floats(0, 1),
    values=st.floats(-1e6, 1e6),
)
def test_json_round_trip_hypothesis(units, alpha, values):
    obj = PartialInsert(units, values=values, alpha=alpha)
    assert from_json(json.loads(json.dumps(obj.to_json()))) == obj


def test_repr_is_readable():
    assert repr(Ablate([3, 7])) == "Ablate(units=[3, 7])"
    assert repr(Scale([1], factor=2)) == "Scale(units=[1], factor=2.0)"
    long = repr(PartialAblate(list(range(100)), alpha=0.5))
    assert long.startswith("PartialAblate(units=[0, 1, 2, 3, 4, 5, ... (100)]") and len(long) < 80
    assert "2x2 mask, 3 on" in repr(Ablate([0], mask=[[1, 1], [1, 0]]))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="alpha must lie in"):
        PartialAblate([0], alpha=1.5)
    with pytest.raises(ValueError, match="units must be channel indices"):
        Ablate([-1])
    with pytest.raises(ValueError, match="mask or token positions"):
        Ablate([0], mask=[[1]], positions=[0])
    with pytest.raises(ValueError, match="layer 'layer4'.*unit 9 out of range for 4 channels"):
        Ablate([9])(torch.zeros(1, 4, 2, 2), "layer4")
    with pytest.raises(ValueError, match=r"mask has shape \[2, 2\].*spatial shape \[3, 3\]"):
        Ablate([0], mask=[[1, 0], [0, 1]]).apply(torch.zeros(1, 2, 3, 3))
    with pytest.raises(ValueError, match="values has 2 values for 1 units"):
        Replace([0], values=[1.0, 2.0]).apply(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="unknown intervention type 'Nope'"):
        from_json({"type": "Nope"})


def test_registry_accepts_new_kinds():
    @interventions.register(name="Negate")
    class Negate(Intervention):
        """Flip the sign of the units."""

        def target(self, r):
            return -r

    try:
        obj = from_json({"type": "Negate", "units": [1]})
        assert isinstance(obj, Negate) and obj.to_json() == {"type": "Negate", "units": [1]}
        torch.testing.assert_close(obj.apply(torch.ones(1, 2)), torch.tensor([[1.0, -1.0]]))
    finally:
        interventions.REGISTRY.pop("Negate")
    with pytest.raises(TypeError):
        interventions.register(int)


def test_units_accept_ints_sets_ranges_and_tensors():
    assert Ablate(3).units == [3]
    assert sorted(Ablate({2, 1}).units) == [1, 2]
    assert Ablate(range(3)).units == [0, 1, 2]
    assert Ablate(torch.tensor([4, 5])).units == [4, 5]
    x = torch.randn(2, 3)
    assert torch.equal(Ablate([]).apply(x), x)
    with pytest.raises(ValueError, match="units must be channel indices"):
        Ablate([1.5])


@SETTINGS
@given(conv_case())
def test_intervention_through_a_trace_reaches_the_next_layer(case):
    """Through Trace: the retained output and what the next layer receives are the edit."""
    x, units, mask, alpha, values = case
    h, w = x.shape[2], x.shape[3]
    model = nn.Sequential(nn.Identity(), nn.Identity()).double()
    edit = PartialInsert(units, values=values, alpha=alpha, mask=mask)
    with (
        torch.no_grad(),
        Trace(model, "0", edit_output=edit) as t,
        Trace(model, "1", retain_input=True) as nxt,
    ):
        y = model(x)
    p = torch.ones(h, w, dtype=x.dtype) if mask is None else mask
    want = x.clone()
    for i, u in enumerate(units):
        want[:, u] = (1 - alpha[i] * p) * x[:, u] + alpha[i] * p * values[i]
    torch.testing.assert_close(t.output, want)
    torch.testing.assert_close(nxt.input, want)
    torch.testing.assert_close(y, want)


@SETTINGS
@given(conv_case(), st.booleans())
def test_per_image_masks_and_tensor_parameters(case, as_tensors):
    """A ``[B, h, w]`` mask blends each image with its own map; tensor ``alpha`` and
    ``values`` act like the lists they hold."""
    x, units, _, alpha, values = case
    b, _, h, w = x.shape
    gen = torch.Generator().manual_seed(len(units))
    masks = torch.rand(b, h, w, generator=gen, dtype=torch.float64)
    masks[0] = 0  # the first image is left alone
    a = torch.tensor(alpha, dtype=torch.float64) if as_tensors else alpha
    k = torch.tensor(values, dtype=torch.float64) if as_tensors else values
    got = PartialInsert(units, values=k, alpha=a, mask=masks).apply(x)
    got_ablate = PartialAblate(units, alpha=a, mask=masks).apply(x)
    want, want_ablate = x.clone(), x.clone()
    for i, u in enumerate(units):
        ap = alpha[i] * masks
        want[:, u] = (1 - ap) * x[:, u] + ap * values[i]
        want_ablate[:, u] = (1 - ap) * x[:, u]
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_ablate, want_ablate)
    assert torch.equal(got[0], x[0])


def test_gradients_reach_tensor_alpha_and_values_and_updates_are_seen():
    """d/d alpha_u of sum(edit) = sum over the region of p (k_u - r_u); d/d k_u = sum(alpha_u p)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    masks = torch.rand(2, 4, 4, generator=gen, dtype=torch.float64)
    alpha = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64, requires_grad=True)
    k = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64, requires_grad=True)
    insert = PartialInsert(values=k, alpha=alpha, mask=masks)
    insert.apply(x).sum().backward()
    p = masks[:, None]
    torch.testing.assert_close(
        alpha.grad, (p * (k.detach()[None, :, None, None] - x)).sum((0, 2, 3))
    )
    torch.testing.assert_close(k.grad, alpha.detach() * masks.sum())
    ablate = PartialAblate(alpha=alpha, mask=masks)
    alpha.grad = None
    ablate.apply(x).sum().backward()
    torch.testing.assert_close(alpha.grad, -(p * x).sum((0, 2, 3)))
    with torch.no_grad():  # an optimizer step changes alpha in place: the edit follows
        alpha.zero_()
    assert torch.equal(ablate.apply(x), x) and torch.equal(insert.apply(x), x)


def test_tensor_parameters_round_trip_through_json_as_lists():
    alpha = torch.tensor([0.25, 1.0], requires_grad=True)
    masks = torch.tensor([[[1.0, 0.0]], [[0.5, 1.0]]])
    obj = PartialInsert(values=torch.tensor([2.0, -1.0]), alpha=alpha, mask=masks)
    d = obj.to_json()
    assert d["alpha"] == [0.25, 1.0] and d["mask"] == [[[1.0, 0.0]], [[0.5, 1.0]]]
    back = from_json(json.loads(json.dumps(d)))
    assert back == obj
    x = torch.randn(2, 2, 1, 2)
    torch.testing.assert_close(back.apply(x), obj.apply(x).detach())
    assert "alpha=[0.25, 1.0]" in repr(obj) and "2x1x2 mask" in repr(obj)


def test_per_image_token_masks():
    x = torch.randn(2, 3, 4)
    mask = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    got = Ablate([1], mask=mask).apply(x)
    assert got[0, 0, 1] == 0 and got[1, 2, 1] == 0
    assert torch.equal(got[0, 1:], x[0, 1:]) and torch.equal(got[1, :2], x[1, :2])


def test_bad_tensor_input_is_named():
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\], got \[0.5, 2.0\]"):
        PartialAblate(alpha=torch.tensor([0.5, 2.0]))
    with pytest.raises(ValueError, match="mask values must lie in"):
        Ablate([0], mask=torch.full((2, 2), 1.5))
    with pytest.raises(ValueError, match=r"mask has shape \[3, 2, 2\].*\[2, 2, 2\]"):
        Ablate([0], mask=torch.ones(3, 2, 2)).apply(torch.zeros(2, 1, 2, 2))
    with pytest.raises(ValueError, match="alpha has 2 values for 3 units"):
        PartialAblate(alpha=torch.tensor([0.5, 0.5])).apply(torch.zeros(1, 3, 2, 2))
