"""Reversible low-rank weight edits: ``W = W_base + Σ Λ_i D_iᵀ``.

An :class:`Edit` holds the low-rank factors of one change to one layer, the layer's
name and a hash of the weights it was computed against. Applying records the
layer's pristine weight once in a per-module ledger; the weight is always
recomputed as ``base + Σ deltas`` in a canonical order, so edits compose and revert
in any order, and reverting the last one restores the weight bit for bit.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from nethook.atomic import atomic_path
from nethook.hashing import content_key
from nethook.layers import resolve_layer as _module
from nethook.rewrite.memory import LinearMemory

FORMAT_VERSION = 1
_LEDGER = "_nethook_edit_ledger"


def weights_hash(module: nn.Module) -> str:
    """Content hash of a layer's weight: what an edit was computed for."""
    return content_key(weight=module.weight)


@dataclass
class Edit:
    """A low-rank change ``Λ Dᵀ`` of one layer's memory matrix.

    ``lam`` is ``[m, s]`` and ``directions`` ``[n, s]`` in the layer's
    associative-memory coordinates (see :mod:`nethook.rewrite.memory`).
    """

    layer: str
    lam: torch.Tensor
    directions: torch.Tensor
    base_hash: str
    info: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        """Number of directions of the change (its rank when they are independent)."""
        return self.directions.shape[1]

    @property
    def key(self) -> str:
        """Content hash identifying this edit."""
        return content_key(lam=self.lam, directions=self.directions)

    def delta(self, model: nn.Module) -> torch.Tensor:
        """The change in the weight's own layout (``Λ Dᵀ`` mapped back)."""
        memory = LinearMemory(_module(model, self.layer))
        weight = memory.module.weight
        if (self.lam.shape[0], self.directions.shape[0]) != memory.shape:
            raise ValueError(
                f"edit of shape [{self.lam.shape[0]}, {self.directions.shape[0]}] does not fit "
                f"layer {self.layer!r} whose memory matrix is {list(memory.shape)}"
            )
        lam = self.lam.to(weight.device, torch.float64)
        dirs = self.directions.to(weight.device, torch.float64)
        return memory.to_weight(lam @ dirs.T)

    def is_applied(self, model: nn.Module) -> bool:
        """Whether this edit is currently applied to ``model``."""
        ledger = getattr(_module(model, self.layer), _LEDGER, None)
        return bool(ledger) and self.key in ledger["edits"]

    def apply(self, model: nn.Module) -> Edit:
        """Apply to ``model`` in place; refuses weights other than those it was made for."""
        module = _module(model, self.layer)
        ledger = getattr(module, _LEDGER, None)
        current = weights_hash(module)
        allowed = {current} if ledger is None else {current, ledger["base_hash"]}
        if self.base_hash not in allowed:
            raise ValueError(
                f"edit was computed for weights {self.base_hash} of layer {self.layer!r}, "
                f"but the layer now holds weights {current}; refusing to apply"
            )
        if ledger is None:
            ledger = {"base": module.weight.detach().clone(), "base_hash": current, "edits": {}}
            setattr(module, _LEDGER, ledger)
        if self.key in ledger["edits"]:
            raise ValueError(f"edit {self.key} is already applied to layer {self.layer!r}")
        ledger["edits"][self.key] = self
        _recompute(module, model)
        return self

    def revert(self, model: nn.Module) -> Edit:
        """Undo this edit; with no edits left the weight is restored bit for bit."""
        module = _module(model, self.layer)
        ledger = getattr(module, _LEDGER, None)
        if not ledger or self.key not in ledger["edits"]:
            raise ValueError(f"edit {self.key} is not applied to layer {self.layer!r}")
        del ledger["edits"][self.key]
        _recompute(module, model)
        if not ledger["edits"]:
            delattr(module, _LEDGER)
        return self

    def save(self, path: str | os.PathLike) -> Path:
        """Write to a ``.safetensors`` file atomically (no pickle)."""
        from safetensors.torch import save_file

        path = Path(path)
        meta = {
            "format": "nethook.rewrite.Edit",
            "version": str(FORMAT_VERSION),
            "layer": self.layer,
            "base_hash": self.base_hash,
            "info": json.dumps(self.info),
        }
        tensors = {
            "lam": self.lam.contiguous().cpu(),
            "directions": self.directions.contiguous().cpu(),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Edit:
        """Read an edit written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no edit file at {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "nethook.rewrite.Edit":
                raise ValueError(f"{path} is not a nethook edit file")
            if int(meta["version"]) > FORMAT_VERSION:
                raise ValueError(
                    f"{path} has edit format version {meta['version']}, newer than version "
                    f"{FORMAT_VERSION} that this nethook reads"
                )
            return cls(
                layer=meta["layer"],
                lam=f.get_tensor("lam"),
                directions=f.get_tensor("directions"),
                base_hash=meta["base_hash"],
                info=json.loads(meta.get("info", "{}")),
            )

    def __repr__(self) -> str:
        return (
            f"Edit(layer={self.layer!r}, rank={self.rank}, "
            f"shape=[{self.lam.shape[0]}, {self.directions.shape[0]}], base={self.base_hash[:8]})"
        )


def _recompute(module: nn.Module, model: nn.Module) -> None:
    ledger = getattr(module, _LEDGER)
    base = ledger["base"]
    with torch.no_grad():
        if not ledger["edits"]:
            module.weight.copy_(base)
            return
        total = torch.zeros(base.shape, dtype=torch.float64, device=base.device)
        for key in sorted(ledger["edits"]):
            total += ledger["edits"][key].delta(model)
        module.weight.copy_((base.to(torch.float64) + total).to(base.dtype))
