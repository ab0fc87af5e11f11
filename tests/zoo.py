"""A zoo of small models that exercise every awkward case of tracing.

Import with ``from tests.zoo import ...`` (the tests run from the repository root).
All models are tiny, deterministic given a seed, and need no downloads.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, namedtuple
from typing import Any

import torch
from torch import nn


def resnet18(seed: int = 0, num_classes: int = 10) -> nn.Module:
    """torchvision ResNet-18 with random weights, in eval mode."""
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None, num_classes=num_classes).eval()


class Counted(nn.Module):
    """Wraps a module and counts how often it is called (``.calls``)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.inner(*args, **kwargs)


def counted_chain(width: int = 4, depth: int = 4, seed: int = 0) -> nn.Sequential:
    """``depth`` counted Linear layers in a Sequential named ``"0"``, ``"1"``, ...."""
    torch.manual_seed(seed)
    return nn.Sequential(*[Counted(nn.Linear(width, width)) for _ in range(depth)])


class Block(nn.Module):
    """A pre-norm transformer block; returns the tuple ``(hidden, None)`` like HF layers."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None):
        x = self.ln1(h)
        a, weights = self.attn(x, x, x, need_weights=False, key_padding_mask=attention_mask)
        h = h + a
        h = h + self.mlp(self.ln2(h))
        return h, weights


class TinyTransformer(nn.Module):
    """Token ids ``[B, T]`` -> ``(logits [B, T, V], hidden states tuple)``.

    Blocks live in a ModuleList ``blocks``; each is called with a keyword argument
    and returns a tuple holding None, as Hugging Face decoder layers do.
    """

    def __init__(
        self, vocab: int = 32, dim: int = 16, heads: int = 2, depth: int = 2, seed: int = 0
    ):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor):
        h = self.embed(ids)
        hidden = [h]
        for block in self.blocks:
            h, _ = block(h, attention_mask=None)
            hidden.append(h)
        return self.head(self.norm(h)), tuple(hidden)


class SharedThrice(nn.Module):
    """``head(step(step(step(x))))``: the module ``step`` runs three times per forward."""

    def __init__(self, width: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.step = nn.Linear(width, width)
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            x = self.step(x)
        return self.head(x)


class Nested(nn.Module):
    """Stages in a ModuleList of ModuleDicts: paths like ``stages.1.gate``."""

    def __init__(self, width: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.stages = nn.ModuleList(
            nn.ModuleDict({"proj": nn.Linear(width, width), "gate": nn.Linear(width, width)})
            for _ in range(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage["proj"](x) * torch.sigmoid(stage["gate"](x))
        return x


class ScaleShift(nn.Module):
    """``x * scale + shift``: a module whose inputs come by keyword."""

    def forward(self, x: torch.Tensor, *, scale: float = 1.0, shift: torch.Tensor | None = None):
        return x * scale + (0 if shift is None else shift)


class KwargsModel(nn.Module):
    """Calls its ``block`` with keyword arguments only: ``block(x=x, scale=2.0, shift=s)``."""

    def __init__(self):
        super().__init__()
        self.block = ScaleShift()
        self.out = nn.Identity()

    def forward(self, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return self.out(self.block(x=x, scale=2.0, shift=shift))


Pair = namedtuple("Pair", ["first", "second"])


@dataclasses.dataclass
class Output:
    """A dataclass output with optional fields, like a Hugging Face ``ModelOutput``."""

    hidden: torch.Tensor
    extra: torch.Tensor | None = None


@dataclasses.dataclass
class DictOutput(OrderedDict):
    """An OrderedDict that is also a dataclass, as Hugging Face ``ModelOutput`` is."""

    hidden: torch.Tensor | None = None
    scores: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None:
                self[field.name] = value


class Emit(nn.Module):
    """Returns ``x`` wrapped in one structure: tuple, namedtuple, dict, dataclass, modeloutput."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> Any:
        if self.kind == "tuple":
            return (x, None, 2 * x)
        if self.kind == "namedtuple":
            return Pair(x, 2 * x)
        if self.kind == "dict":
            return {"hidden": x, "double": 2 * x}
        if self.kind == "dataclass":
            return Output(hidden=x, extra=None)
        if self.kind == "modeloutput":
            return DictOutput(hidden=x, scores=2 * x)
        raise ValueError(self.kind)


STRUCTURES = ("tuple", "namedtuple", "dict", "dataclass", "modeloutput")


class Structured(nn.Module):
    """Passes ``x`` through one ``Emit`` per structure kind and reads ``hidden`` back."""

    def __init__(self):
        super().__init__()
        self.emit = nn.ModuleDict({kind: Emit(kind) for kind in STRUCTURES})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(x)
        for module in self.emit.values():
            out = module(x)
            first = (
                out[0]
                if isinstance(out, tuple)
                else (out["hidden"] if isinstance(out, dict) else out.hidden)
            )
            total = total + first
        return total


class Fails(nn.Module):
    """Raises ``error`` in its forward pass (after a Linear ran)."""

    def __init__(self, error: BaseException):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.boom = Counted(nn.Identity())
        self.error = error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.boom(self.pre(x))
        raise self.error


def hook_counts(model: nn.Module) -> int:
    """Total forward hooks and pre-hooks (with or without kwargs) held by any module."""
    total = 0
    for module in model.modules():
        total += len(module._forward_hooks) + len(module._forward_pre_hooks)
    return total
