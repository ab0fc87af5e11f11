"""Closed forms of the rewriting method (thesis ch. 6, app. B), in plain linear algebra.

A layer is an associative memory ``v = W k`` with ``W`` of shape ``[m, n]`` (values
``m``, keys ``n``). ``C = K Kᵀ`` is the second moment of the keys the layer has seen.
Inserting ``k* → v*`` with the least change to every other stored key moves ``W``
only along rows ``dᵀ = (C⁻¹ k*)ᵀ``. Everything here solves with Cholesky; no explicit
inverse is ever formed.
"""

from __future__ import annotations

import torch


class NotPositiveDefiniteError(ValueError):
    """Raised when the key second moment ``C`` cannot be factored."""


def check_square(C: torch.Tensor, n: int, name: str = "C") -> None:
    """Raise unless ``C`` is ``[n, n]``, naming both sizes."""
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"{name} must be a square [n, n] matrix, got shape {tuple(C.shape)}")
    if C.shape[0] != n:
        raise ValueError(
            f"{name} is {C.shape[0]} x {C.shape[1]} but the keys have {n} dimensions; "
            "C must be the second moment of this layer's keys"
        )


def cholesky(C: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """Cholesky factor of ``C + ridge·I``; a clear error when it is not positive definite."""
    if ridge:
        C = C + ridge * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    L, info = torch.linalg.cholesky_ex(C)
    if int(info) != 0:
        raise NotPositiveDefiniteError(
            f"the key second moment C ({C.shape[0]} x {C.shape[1]}) is not positive definite "
            f"(Cholesky failed at column {int(info)}); collect it over more samples or pass "
            "a ridge, e.g. ridge=1e-3 * trace(C) / n"
        )
    return L


def solve_psd(C: torch.Tensor, B: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """Solve ``(C + ridge·I) X = B`` for symmetric positive definite ``C`` (B: ``[n]`` or ``[n, s]``)."""
    check_square(C, B.shape[0])
    L = cholesky(C, ridge)
    vector = B.ndim == 1
    X = torch.cholesky_solve(B[:, None] if vector else B, L)
    return X[:, 0] if vector else X


def update_direction(C: torch.Tensor, k_star: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """``d = C⁻¹ k*``: the only row direction an insertion of ``k*`` may change (eq. 6.16)."""
    return solve_psd(C, k_star, ridge)


def rank_one_update(
    W0: torch.Tensor,
    C: torch.Tensor,
    k_star: torch.Tensor,
    v_star: torch.Tensor,
    ridge: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form insertion of one key into a linear layer (thesis app. B.1).

    Returns the factors ``(Λ, d)`` with ``W1 = W0 + Λ dᵀ`` and ``W1 k* = v*``; this is
    the constrained least-squares solution ``argmin ||V − W K||`` subject to
    ``W k* = v*`` given ``C = K Kᵀ``. Shapes: ``W0 [m, n]``, ``C [n, n]``,
    ``k_star [n]``, ``v_star [m]``; ``Λ [m]``, ``d [n]``.
    """
    _check_kv(W0, k_star[None], v_star[None])
    d = update_direction(C, k_star.to(C.dtype), ridge).to(W0.dtype)
    residual = v_star - W0 @ k_star
    return residual / (d @ k_star), d


def constrained_update(
    W0: torch.Tensor,
    D: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
) -> torch.Tensor:
    """``Λ`` minimizing ``||V* − (W0 + Λ Dᵀ) K*||`` for fixed directions ``D [n, s]``.

    ``keys [t, n]`` and ``values [t, m]`` hold one pair per row. With ``t == s``
    independent keys and ``D = C⁻¹ K*ᵀ`` this inserts every pair exactly. Returns
    ``Λ [m, s]``.
    """
    _check_kv(W0, keys, values)
    residual = values - keys @ W0.T  # [t, m]
    M = keys @ D  # [t, s]
    return torch.linalg.lstsq(M, residual).solution.T


def least_squares_update(
    W0: torch.Tensor,
    C: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    weight: float = 1.0,
) -> torch.Tensor:
    """Soft multi-key edit ``ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹`` (the MEMIT form).

    Minimizes ``λ ||ΔW K0||² + ||V* − (W0 + ΔW) K*||²`` where ``C = K0 K0ᵀ``;
    ``keys [t, n]``, ``values [t, m]``; returns ``ΔW [m, n]``.
    """
    _check_kv(W0, keys, values)
    check_square(C, W0.shape[1])
    residual = values - keys @ W0.T  # [t, m]
    A = weight * C + keys.T @ keys
    return solve_psd(A, keys.T @ residual).T


def context_directions(
    C: torch.Tensor, context_keys: torch.Tensor, rank: int, ridge: float = 0.0
) -> torch.Tensor:
    """Rank-reduced update directions from context keys (thesis app. B.3).

    Whitens with ``Z = C^{-1/2}``, keeps the top-``rank`` eigenvectors ``Q_S`` of
    ``K' K'ᵀ`` (``K' = Z K_ctx``) and returns ``D_S = Z Q_S`` of shape ``[n, rank]``.
    ``context_keys`` is ``[t, n]``.
    """
    if context_keys.ndim != 2:
        raise ValueError(f"context keys must be [t, n], got shape {tuple(context_keys.shape)}")
    n = context_keys.shape[1]
    check_square(C, n)
    if not 1 <= rank <= n:
        raise ValueError(f"rank must be between 1 and {n}, got {rank}")
    if ridge:
        C = C + ridge * torch.eye(n, dtype=C.dtype, device=C.device)
    evals, evecs = torch.linalg.eigh(C)
    if evals.min() <= 0:
        raise NotPositiveDefiniteError(
            f"the key second moment C has a non-positive eigenvalue ({float(evals.min()):.3g}); "
            "pass a ridge, e.g. ridge=1e-3 * trace(C) / n"
        )
    Z = (evecs * evals.rsqrt()) @ evecs.T
    Kp = Z @ context_keys.to(C.dtype).T  # [n, t]
    _, vecs = torch.linalg.eigh(Kp @ Kp.T)
    Q = vecs[:, -rank:].flip(-1)
    return Z @ Q


def _check_kv(W0: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
    if W0.ndim != 2:
        raise ValueError(f"W0 must be a [m, n] matrix, got shape {tuple(W0.shape)}")
    m, n = W0.shape
    if keys.ndim != 2 or keys.shape[1] != n:
        raise ValueError(
            f"keys must be [t, {n}] for W of shape [{m}, {n}], got {tuple(keys.shape)}"
        )
    if values.ndim != 2 or values.shape[1] != m or values.shape[0] != keys.shape[0]:
        raise ValueError(
            f"values must be [{keys.shape[0]}, {m}] to match keys {tuple(keys.shape)} and W "
            f"[{m}, {n}], got {tuple(values.shape)}"
        )
