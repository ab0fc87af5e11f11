"""Random rotations for the axis-alignment test: uniform, exact powers, applied right."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nethook.rotation import Rotate, fractional_rotation, random_rotation


@given(n=st.integers(1, 24), seed=st.integers(0, 10_000))
@settings(max_examples=40, deadline=None)
def test_random_rotation_is_special_orthogonal(n: int, seed: int) -> None:
    q = random_rotation(n, seed)
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-10)
    assert np.linalg.det(q) == pytest.approx(1.0)
    np.testing.assert_array_equal(q, random_rotation(n, seed))


def test_random_rotation_is_uniform() -> None:
    """Haar measure on SO(n): every entry has mean 0 and mean square 1/n."""
    n, draws = 4, 3000
    qs = np.stack([random_rotation(n, s) for s in range(draws)])
    assert np.abs(qs.mean(0)).max() < 0.06
    np.testing.assert_allclose((qs**2).mean(0), 1 / n, atol=0.03)


@given(n=st.integers(2, 16), seed=st.integers(0, 1000), a=st.floats(0, 1), b=st.floats(0, 1))
@settings(max_examples=40, deadline=None)
def test_fractional_powers_compose(n: int, seed: int, a: float, b: float) -> None:
    q = random_rotation(n, seed)
    np.testing.assert_allclose(fractional_rotation(q, 0.0), np.eye(n), atol=1e-9)
    np.testing.assert_allclose(fractional_rotation(q, 1.0), q, atol=1e-9)
    pa, pb = fractional_rotation(q, a / 2), fractional_rotation(q, b / 2)
    np.testing.assert_allclose(pa @ pa.T, np.eye(n), atol=1e-9)
    np.testing.assert_allclose(pa @ pb, fractional_rotation(q, (a + b) / 2), atol=1e-8)


def test_half_rotation_squares_to_q_with_minus_one_eigenvalues() -> None:
    q = np.diag([-1.0, -1.0, 1.0])  # rotation by pi in a plane: real Schur has lone -1s
    half = fractional_rotation(q, 0.5)
    np.testing.assert_allclose(half @ half, q, atol=1e-12)
    np.testing.assert_allclose(half @ half.T, np.eye(3), atol=1e-12)


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="rotation"):
        fractional_rotation(np.diag([1.0, -1.0]), 0.5)
    with pytest.raises(ValueError, match="alpha"):
        fractional_rotation(np.eye(2), 1.5)
    with pytest.raises(ValueError, match="channels"):
        Rotate(3)(torch.zeros(1, 4, 2, 2), "conv")


def test_rotate_acts_on_channels() -> None:
    x = torch.randn(2, 5, 3, 4)
    rot = Rotate(5, alpha=1.0, seed=7)
    y = rot(x, "layer")
    q = torch.from_numpy(random_rotation(5, 7)).float()
    expected = torch.einsum("ij,bjhw->bihw", q, x)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(Rotate(5, alpha=0.0)(x), x)
    tokens = torch.randn(2, 3, 5)
    torch.testing.assert_close(
        Rotate(5, seed=7, channel_dim=-1)(tokens), tokens @ q.T, atol=1e-5, rtol=1e-5
    )
    assert Rotate(**{k: v for k, v in rot.to_json().items() if k != "type"}).alpha == 1.0
