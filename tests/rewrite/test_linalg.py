"""Closed forms of rewriting against independent numpy solutions."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nethook.rewrite import linalg


def memory(seed: int, m: int, n: int, samples: int, condition: float):
    """A layer W0 fitted by least squares to keys K with a chosen condition number."""
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.normal(size=(n, n)))
    scales = np.logspace(0, np.log10(condition) / 2, n)
    K = U @ np.diag(scales) @ rng.normal(size=(n, samples))
    V = rng.normal(size=(m, samples))
    C = K @ K.T
    W0 = np.linalg.solve(C, K @ V.T).T  # normal equations
    return K, V, C, W0, rng


def lagrange_solution(K, V, k_star, v_star):
    """argmin ||V - W K||² s.t. W k* = v*, from the KKT block system (thesis B.3)."""
    n = K.shape[0]
    C = K @ K.T
    A = np.zeros((n + 1, n + 1))
    A[:n, :n] = C
    A[:n, n] = k_star
    A[n, :n] = -k_star
    rhs = np.concatenate([K @ V.T, v_star[None]], axis=0)  # [n+1, m]
    sol = np.linalg.solve(A.T, rhs)  # unknowns [W | Λ]ᵀ
    return sol[:n].T


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    m=st.integers(1, 8),
    n=st.integers(2, 10),
    condition=st.sampled_from([1.0, 1e3, 1e6]),
)
def test_rank_one_equals_constrained_least_squares(seed, m, n, condition):
    K, V, C, W0, rng = memory(seed, m, n, 4 * n, condition)
    k_star, v_star = rng.normal(size=n), rng.normal(size=m)
    lam, d = linalg.rank_one_update(*(torch.tensor(a) for a in (W0, C, k_star, v_star)))
    W1 = W0 + np.outer(lam.numpy(), d.numpy())
    expected = lagrange_solution(K, V, k_star, v_star)
    scale = np.abs(expected).max()
    assert np.abs(W1 - expected).max() <= 1e-15 * scale * max(condition, 10.0)
    assert np.allclose(W1 @ k_star, v_star, atol=1e-8 * max(1, np.abs(v_star).max()) * condition)
    # the update direction is C⁻¹ k*
    assert np.allclose(C @ d.numpy(), k_star, rtol=1e-6, atol=1e-8 * condition)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), s=st.integers(1, 4))
def test_constrained_update_inserts_every_key_with_rank_s(seed, s):
    K, V, C, W0, rng = memory(seed, 6, 8, 40, 10.0)
    keys = torch.tensor(rng.normal(size=(s, 8)))
    values = torch.tensor(rng.normal(size=(s, 6)))
    D = linalg.solve_psd(torch.tensor(C), keys.T)
    lam = linalg.constrained_update(torch.tensor(W0), D, keys, values)
    W1 = torch.tensor(W0) + lam @ D.T
    assert torch.allclose(keys @ W1.T, values, atol=1e-8)
    assert torch.linalg.matrix_rank(W1 - torch.tensor(W0)) == s


def test_least_squares_update_matches_normal_equations():
    K, V, C, W0, rng = memory(3, 5, 7, 30, 10.0)
    keys, values = rng.normal(size=(3, 7)), rng.normal(size=(3, 5))
    lam_reg = 0.5
    dW = linalg.least_squares_update(
        torch.tensor(W0), torch.tensor(C), torch.tensor(keys), torch.tensor(values), lam_reg
    ).numpy()
    # gradient of  λ||dW K||² + ||V* − (W0 + dW) K*||²  vanishes at the optimum
    R = values.T - (W0 + dW) @ keys.T
    grad = lam_reg * dW @ C - R @ keys
    assert np.abs(grad).max() < 1e-8


def test_context_directions_span_the_whitened_top_eigenvectors():
    K, V, C, W0, rng = memory(5, 4, 6, 50, 100.0)
    ctx = rng.normal(size=(1, 6)).repeat(5, 0) * rng.uniform(0.5, 2, size=(5, 1))
    D = linalg.context_directions(torch.tensor(C), torch.tensor(ctx), rank=1).numpy()[:, 0]
    # with every context key along one k, the only informative direction is C⁻¹ k
    expected = np.linalg.solve(C, ctx[0])
    cos = abs(D @ expected) / np.linalg.norm(D) / np.linalg.norm(expected)
    assert cos > 1 - 1e-9


def test_errors_name_shapes_and_suggest_ridge():
    W0 = torch.zeros(3, 4, dtype=torch.float64)
    C = torch.eye(4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"C is 5 x 5 but the keys have 4"):
        linalg.rank_one_update(W0, torch.eye(5, dtype=torch.float64), torch.ones(4), torch.ones(3))
    with pytest.raises(ValueError, match=r"values must be \[1, 3\]"):
        linalg.rank_one_update(W0, C, torch.ones(4, dtype=torch.float64), torch.ones(2))
    singular = torch.zeros(4, 4, dtype=torch.float64)
    with pytest.raises(linalg.NotPositiveDefiniteError, match="ridge"):
        linalg.rank_one_update(W0, singular, torch.ones(4, dtype=torch.float64), torch.ones(3))
    lam, d = linalg.rank_one_update(
        W0,
        singular,
        torch.ones(4, dtype=torch.float64),
        torch.ones(3, dtype=torch.float64),
        ridge=1.0,
    )
    assert torch.allclose(
        (W0 + torch.outer(lam, d)) @ torch.ones(4, dtype=torch.float64),
        torch.ones(3, dtype=torch.float64),
    )
