"""``insert``: write new key → value pairs into one layer as a reversible low-rank edit."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from nethook.layers import resolve_layer
from nethook.rewrite import linalg
from nethook.rewrite.edit import Edit, weights_hash
from nethook.rewrite.memory import LinearMemory

METHODS = ("closed_form", "least_squares", "optimize", "pgd")


def insert(
    model: nn.Module,
    layer: str,
    keys: torch.Tensor,
    values: torch.Tensor,
    C: torch.Tensor,
    context: torch.Tensor | None = None,
    rank: int | None = None,
    method: str = "closed_form",
    ridge: float = 0.0,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    steps: int = 2001,
    lr: float = 0.05,
    project_every: int = 10,
    weight: float = 1.0,
) -> Edit:
    """Compute an :class:`Edit` so that ``layer`` maps each key to its value.

    ``keys [t, n]`` and ``values [t, m]`` are in the layer's associative-memory
    coordinates (:class:`~nethook.rewrite.memory.LinearMemory`; the bias is not part
    of the memory). ``C [n, n]`` is the second moment of the layer's keys
    (:func:`nethook.rewrite.key_second_moment`). Directions are ``C⁻¹ kᵢ`` (rank
    ``t``), or the top-``rank`` whitened directions of ``context`` keys (thesis app.
    B.3). Methods (thesis §6.3):

    - ``closed_form``: exact least change for a linear layer (app. B.1);
    - ``least_squares``: the soft form ``ΔW = R Kᵀ (λC + K Kᵀ)⁻¹`` (``weight`` = λ);
    - ``optimize``: Λ by Adam over the fixed directions, minimizing
      ``loss(head(W k), v)``, for layers followed by a nonlinearity ``head``;
    - ``pgd``: Adam on the full weight, projected onto ``W0 + Λ Dᵀ`` every
      ``project_every`` steps (thesis defaults: lr 0.05, 2001 steps).

    The model is not changed; call ``edit.apply(model)``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    memory = LinearMemory(resolve_layer(model, layer))
    W0 = memory.matrix().to(torch.float64)
    m, n = W0.shape
    nonlinear = method in ("optimize", "pgd")
    keys = _as_2d(keys, n, "keys").to(torch.float64)
    values = _as_2d(values, None if nonlinear and head else m, "values").to(torch.float64)
    if keys.shape[0] != values.shape[0]:
        raise ValueError(f"got {keys.shape[0]} keys but {values.shape[0]} values")
    C = C.to(W0.device, torch.float64)
    linalg.check_square(C, n)

    if method == "least_squares":
        directions = linalg.solve_psd(weight * C + keys.T @ keys, keys.T, ridge)
        lam = (values - keys @ W0.T).T
    else:
        directions = _directions(C, keys, context, rank, ridge)
        if method == "closed_form":
            lam = linalg.constrained_update(W0, directions, keys, values)
        elif method == "optimize":
            lam = _optimize_lambda(W0, directions, keys, values, head, loss, steps, lr)
        else:
            lam, directions = _projected_descent(
                W0, directions, keys, values, head, loss, steps, lr, project_every
            )
    return Edit(
        layer=layer,
        lam=lam.to(torch.float32),
        directions=directions.to(torch.float32),
        base_hash=weights_hash(memory.module),
        info={"method": method, "rank": int(directions.shape[1]), "keys": int(keys.shape[0])},
    )


def _directions(C, keys, context, rank, ridge) -> torch.Tensor:
    if context is not None:
        context = _as_2d(context, keys.shape[1], "context").to(torch.float64)
        return linalg.context_directions(C, context, rank or 1, ridge)
    if rank is not None and rank < keys.shape[0]:
        return linalg.context_directions(C, keys, rank, ridge)
    return linalg.solve_psd(C, keys.T, ridge)


def _optimize_lambda(W0, D, keys, values, head, loss, steps, lr) -> torch.Tensor:
    """Λ from zero by Adam: ``min loss(head(keys (W0 + Λ Dᵀ)ᵀ), values)`` (eq. 6.17/6.18)."""
    head = head or _identity
    loss = loss or _l2
    lam = torch.zeros(W0.shape[0], D.shape[1], dtype=W0.dtype, requires_grad=True)
    opt = torch.optim.Adam([lam], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss(head(keys @ (W0 + lam @ D.T).T), values).backward()
        opt.step()
    return lam.detach()


def _projected_descent(W0, D, keys, values, head, loss, steps, lr, project_every):
    """Adam on W, projected onto ``W0 + Λ Dᵀ`` every few steps; returns ``(Λ, Q)``.

    ``Q`` is an orthonormal basis of ``D``'s column space, so the result is the
    same low-rank family expressed in orthonormal directions.
    """
    head = head or _identity
    loss = loss or _l2
    Q, _ = torch.linalg.qr(D)
    W = W0.clone().requires_grad_(True)
    opt = torch.optim.Adam([W], lr=lr)
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss(head(keys @ W.T), values).backward()
        opt.step()
        if step % project_every == 0 or step == steps:
            with torch.no_grad():
                W.copy_(W0 + (W - W0) @ Q @ Q.T)
    return (W.detach() - W0) @ Q, Q


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).pow(2).sum(-1).mean()


def _as_2d(x: torch.Tensor, dim: int | None, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        want = f"[t, {dim}]" if dim is not None else "[t, d]"
        raise ValueError(f"{name} must be {want} for this layer, got {tuple(x.shape)}")
    return x
