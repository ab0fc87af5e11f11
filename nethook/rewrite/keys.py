"""Collect a layer's keys with the trace engine: at token positions, or their second moment.

The second moment ``C = E[k kᵀ]`` is what every insertion solves against. It is a
:class:`~nethook.stats.moments.SecondMoment` of the layer's input (float64 sums,
mergeable), so it can be split across workers and cached.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from nethook.layers import resolve_layer
from nethook.rewrite.memory import LinearMemory
from nethook.stats.moments import SecondMoment
from nethook.trace import Trace


def token_keys(
    model: nn.Module, layer: str, ids: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Keys ``[B, n]``: the layer's input at ``positions[b]`` of each sequence ``ids [B, T]``."""
    with (
        torch.no_grad(),
        Trace(model, layer, retain_input=True, retain_output=False, stop=True) as t,
    ):
        model(ids)
    x = t.input
    if x.ndim != 3:
        raise ValueError(f"layer {layer!r} input is {tuple(x.shape)}, expected [B, T, n]")
    return x[torch.arange(x.shape[0], device=x.device), positions.to(x.device)]


def key_second_moment(
    model: nn.Module,
    layer: str,
    batches: Iterable,
    forward: Callable[[nn.Module, object], object] | None = None,
    progress: bool = True,
) -> SecondMoment:
    """Accumulate ``E[k kᵀ]`` of ``layer``'s keys over every location of every batch.

    ``batches`` yields model inputs (``forward(model, batch)`` runs one; default
    ``model(batch)``). Conv keys are the input feature vectors at every spatial
    location; sequence keys every token. The forward pass stops after the layer.
    """
    memory = LinearMemory(resolve_layer(model, layer))
    forward = forward or (lambda m, b: m(b))
    stat = SecondMoment()
    for batch in tqdm(batches, desc=f"keys of {layer}", disable=not progress):
        with (
            torch.no_grad(),
            Trace(model, layer, retain_input=True, retain_output=False, stop=True) as t,
        ):
            forward(model, batch)
        stat.update(memory.keys(t.input))
    if stat.count == 0:
        raise ValueError("no batches were given: cannot estimate the key second moment")
    return stat


def optimize_value(
    model: nn.Module,
    layer: str,
    ids: torch.Tensor,
    positions: torch.Tensor,
    last: torch.Tensor,
    targets: torch.Tensor,
    steps: int = 100,
    lr: float = 0.1,
    decay: float = 1e-2,
    keep: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The value ``v*`` the layer should emit at ``positions`` to make the model say ``targets``.

    Adds one trainable vector to the layer's output at each sequence's position,
    trained with Adam to maximize ``log P(targets[b] | ids[b])`` at index ``last[b]``
    (plus ``decay·||δ||²`` relative to the output norm), as ROME computes its value.
    ``keep = (ids, positions, last, targets)`` adds prompts whose answers must not
    change (e.g. the subject's other facts), so the value edits one fact only.
    Returns ``v*`` in memory coordinates (the output without the layer's bias).
    """
    module = resolve_layer(model, layer)
    with torch.no_grad(), Trace(model, layer, stop=True) as t:
        model(ids)
    base = t.output[torch.arange(ids.shape[0]), positions].mean(0)
    delta = torch.zeros_like(base, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)

    def loss_of(ids, positions, last, targets) -> torch.Tensor:
        rows = torch.arange(ids.shape[0])

        def add_delta(output: torch.Tensor) -> torch.Tensor:
            output = output.clone()
            output[rows, positions] += delta
            return output

        with Trace(model, layer, retain_output=False, edit_output=add_delta):
            logits = model(ids)[rows, last]
        return nn.functional.cross_entropy(logits, targets)

    for _ in range(steps):
        loss = loss_of(ids, positions, last, targets)
        if keep is not None:
            loss = loss + loss_of(*keep)
        loss = loss + decay * delta.pow(2).sum() / base.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    value = base + delta.detach()
    bias = getattr(module, "bias", None)
    return value - bias.detach() if bias is not None else value
