"""The intervention and rewriter plugins, used through the registry like any plugin."""

import pytest
import torch
from torch import nn

from nethook.plugins import get_intervention, get_rewriter
from nethook.trace import Trace


def test_intervention_specs_build_working_edits():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4, 4)
    model = nn.Sequential(nn.Identity())
    ablate = get_intervention("ablate:units=[1,3]")
    with Trace(model, "0", edit_output=ablate) as t:
        out = model(x)
    assert torch.equal(out[:, [1, 3]], torch.zeros(2, 2, 4, 4))
    assert torch.equal(out[:, [0, 2, 4]], x[:, [0, 2, 4]])
    assert t.output is not None
    scale = get_intervention("scale:units=[2],factor=0.5")
    with Trace(model, "0", edit_output=scale):
        out = model(x)
    assert torch.allclose(out[:, 2], 0.5 * x[:, 2]) and torch.equal(out[:, 0], x[:, 0])


def test_low_rank_rewriter_inserts_with_the_requested_rank():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(10, 6))
    keys_seen = torch.randn(400, 10, dtype=torch.float64)
    C = keys_seen.T @ keys_seen / 400
    keys, values = torch.randn(4, 10), torch.randn(4, 6)
    exact = get_rewriter("rank-one").insert(model, "0", keys, values, C)
    assert exact.rank == 4
    exact.apply(model)
    assert torch.allclose(keys @ model[0].weight.T, values, atol=1e-4)
    exact.revert(model)
    reduced = get_rewriter("low-rank:rank=2").insert(model, "0", keys, values, C)
    delta = reduced.lam.double() @ reduced.directions.double().T
    assert torch.linalg.matrix_rank(delta) == 2
    with pytest.raises(ValueError, match="needs a rank"):
        get_rewriter("low-rank")
