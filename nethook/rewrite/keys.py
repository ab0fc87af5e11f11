"""Collect a layer's keys with the trace engine: at token positions, or their second moment.

The second moment ``C = E[k kᵀ]`` is what every insertion solves against. It is a
:class:`~nethook.stats.moments.SecondMoment` of the layer's input (float64 sums,
mergeable), collected by the one runner, so it can be checkpointed, split across
workers and cached.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from nethook.hashing import content_key, hash_model
from nethook.layers import resolve_layer
from nethook.rewrite.memory import LinearMemory
from nethook.runner import StatConsumer, run
from nethook.stats.moments import SecondMoment
from nethook.stats.persist import cached
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
    source: Dataset,
    *,
    samples: int | None = None,
    batch_size: int = 32,
    cache: str | os.PathLike | None = None,
    seed: int = 0,
    progress: bool = True,
    **run_options: Any,
) -> SecondMoment:
    """Accumulate ``E[k kᵀ]`` of ``layer``'s keys over every location of ``source``.

    Runs the model with :func:`nethook.runner.run` (the forward pass stops at the
    layer; ``run_options`` such as ``checkpoint`` or ``device`` pass through). Conv
    keys are the input feature vectors at every spatial location, sequence keys every
    token. With ``cache`` (a ``.npz`` or ``.zarr`` path) the result is saved under a
    content key of the model's weights, the layer, the source's fingerprint, the
    sample count and the seed, and reused only when all of them match.
    """
    memory = LinearMemory(resolve_layer(model, layer))

    def compute() -> SecondMoment:
        consumer = StatConsumer(SecondMoment(), layer, transform=memory.keys, of="input")
        run(
            model,
            source,
            [consumer],
            samples=samples,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
            desc=f"keys of {layer}",
            **run_options,
        )
        return consumer.stat

    if cache is None:
        return compute()
    key = content_key(
        kind="key_second_moment",
        model=hash_model(model),
        layer=layer,
        source=_fingerprint(source),
        samples=len(source) if samples is None else int(samples),
        dtype="float64",
        seed=seed,
    )
    return cached(cache, key, compute)


def _fingerprint(source: Dataset) -> str:
    if hasattr(source, "fingerprint"):
        return str(source.fingerprint())
    if isinstance(source, TensorDataset):
        return content_key(tensors=list(source.tensors))
    raise ValueError(
        f"cannot cache key statistics of a {type(source).__name__}: it has no fingerprint(); "
        "give the source a fingerprint() method or pass cache=None"
    )


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
