"""Random changes of basis for the axis-alignment test of Network Dissection (thesis §3.3.2).

``random_rotation(n, seed)`` draws ``Q`` uniformly from SO(n): the QR factorisation
of a Gaussian matrix with the signs fixed so that ``R`` has a positive diagonal
(Haar measure on O(n)), then one column negated if needed so that ``det Q = +1``.
``fractional_rotation(Q, alpha)`` is ``Q**alpha`` computed in the real Schur form,
where an orthogonal matrix is block diagonal with 2 x 2 plane rotations: each
rotation angle is scaled by ``alpha``. ``Rotate`` applies ``Q**alpha`` to a layer's
output along its channel dimension and is usable as a Trace ``edit_output``.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch


def random_rotation(n: int, seed: int = 0) -> np.ndarray:
    """A ``[n, n]`` float64 rotation drawn uniformly from SO(n), reproducible for ``seed``."""
    if n < 1:
        raise ValueError(f"rotation size n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    q = q * np.sign(np.diag(r))[None, :]
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def fractional_rotation(q: np.ndarray, alpha: float) -> np.ndarray:
    """``q ** alpha`` for a rotation ``q`` in SO(n) and ``0 <= alpha <= 1``, via the real Schur form.

    The result is again a rotation; ``alpha = 0`` gives the identity and ``alpha = 1``
    gives ``q``, and ``fractional_rotation(q, a) @ fractional_rotation(q, b)`` equals
    ``fractional_rotation(q, a + b)``.
    """
    q = np.asarray(q, dtype=np.float64)
    n = q.shape[0]
    if q.ndim != 2 or q.shape[1] != n:
        raise ValueError(f"q must be a square matrix, got shape {q.shape}")
    if not np.allclose(q @ q.T, np.eye(n), atol=1e-8) or np.linalg.det(q) < 0:
        raise ValueError("q must be a rotation (orthogonal with determinant +1)")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    t, z = scipy.linalg.schur(q, output="real")
    power = np.zeros_like(t)
    i = 0
    lone_minus: list[int] = []
    while i < n:
        if i + 1 < n and abs(t[i + 1, i]) > 1e-12:
            theta = np.arctan2(t[i + 1, i] - t[i, i + 1], t[i, i] + t[i + 1, i + 1])
            power[i : i + 2, i : i + 2] = _plane(alpha * theta)
            i += 2
        else:
            if t[i, i] > 0:
                power[i, i] = 1.0
            else:
                lone_minus.append(i)
            i += 1
    # det q = +1, so eigenvalues -1 without a 2 x 2 block come in pairs: rotations by pi.
    for a, b in zip(lone_minus[::2], lone_minus[1::2], strict=True):
        idx = np.ix_([a, b], [a, b])
        power[idx] = _plane(alpha * np.pi)
    return z @ power @ z.T


def _plane(theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s], [s, c]])


class Rotate:
    """Change the basis of a layer's output: ``y[:, i] = sum_j R[i, j] x[:, j]``.

    ``R = Q**alpha`` with ``Q = random_rotation(channels, seed)``. Channels are dim 1
    for conv outputs ``[B, C, *spatial]`` (rank >= 3 by default) or the last dim
    (``channel_dim=-1`` for ``[B, T, C]``). Callable as ``edit_output(output, layer)``.
    """

    def __init__(self, channels: int, alpha: float = 1.0, seed: int = 0, channel_dim: int = 1):
        self.channels = int(channels)
        self.alpha = float(alpha)
        self.seed = int(seed)
        self.channel_dim = int(channel_dim)
        q = random_rotation(self.channels, self.seed)
        self.matrix = torch.from_numpy(fractional_rotation(q, self.alpha)).float()

    def __call__(self, output: torch.Tensor, layer: str | None = None) -> torch.Tensor:
        """Return the rotated output (same shape, device and dtype)."""
        dim = self.channel_dim % output.ndim
        if output.shape[dim] != self.channels:
            raise ValueError(
                f"Rotate was built for {self.channels} channels, layer {layer!r} output has "
                f"{output.shape[dim]} at dim {dim} (shape {tuple(output.shape)})"
            )
        m = self.matrix.to(device=output.device, dtype=output.dtype)
        moved = output.movedim(dim, -1)
        return (moved @ m.T).movedim(-1, dim)

    def to_json(self) -> dict:
        """Plain description that rebuilds this rotation (``Rotate(**d)`` without ``type``)."""
        return {
            "type": "Rotate",
            "channels": self.channels,
            "alpha": self.alpha,
            "seed": self.seed,
            "channel_dim": self.channel_dim,
        }
