"""Views of a layer as a linear associative memory ``v = W k``.

Each view maps a module's weight to a ``[m, n]`` matrix whose columns index the key
(input feature) space, and maps a change of that matrix back to the weight's own
shape. ``nn.Linear`` (and GPT-2's transposed ``Conv1D``): key = input vector, value =
output vector. ``nn.Conv2d`` and ``nn.ConvTranspose2d``: key = the input feature
vector at one location, value = the output patch, ``W`` reshaped to
``(out·kh·kw) × in``, so an update direction lives in input-channel space and
applies at every kernel tap.
"""

from __future__ import annotations

import torch
from torch import nn


class LinearMemory:
    """The associative-memory view of one module's weight."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.kind = memory_kind(module)
        w = module.weight
        if self.kind in ("conv2d", "conv_transpose2d"):
            if module.groups != 1:
                raise ValueError(
                    f"grouped {type(module).__name__} (groups={module.groups}) is not a "
                    "single linear map"
                )
            out, inp = module.out_channels, module.in_channels
            kh, kw = w.shape[-2:]
            self.shape = (out * kh * kw, inp)
        elif self.kind == "conv1d_transposed":
            self.shape = (w.shape[1], w.shape[0])
        else:
            self.shape = tuple(w.shape)

    @property
    def keys_dim(self) -> int:
        """Dimension ``n`` of a key."""
        return self.shape[1]

    @property
    def values_dim(self) -> int:
        """Dimension ``m`` of a value."""
        return self.shape[0]

    def matrix(self) -> torch.Tensor:
        """The weight as the ``[m, n]`` memory matrix (a copy for conv layers)."""
        w = self.module.weight.detach()
        if self.kind == "conv2d":
            return w.permute(0, 2, 3, 1).reshape(self.shape)
        if self.kind == "conv_transpose2d":
            return w.permute(1, 2, 3, 0).reshape(self.shape)
        if self.kind == "conv1d_transposed":
            return w.T
        return w

    def to_weight(self, delta: torch.Tensor) -> torch.Tensor:
        """Map a ``[m, n]`` change of the memory matrix to the weight's own layout."""
        w = self.module.weight
        if self.kind == "conv2d":
            out, inp, kh, kw = w.shape
            return delta.reshape(out, kh, kw, inp).permute(0, 3, 1, 2)
        if self.kind == "conv_transpose2d":
            inp, out, kh, kw = w.shape
            return delta.reshape(out, kh, kw, inp).permute(3, 0, 1, 2)
        if self.kind == "conv1d_transposed":
            return delta.T
        return delta

    def keys(self, layer_input: torch.Tensor, where: torch.Tensor | None = None) -> torch.Tensor:
        """Keys ``[t, n]`` from the layer's input at the selected locations.

        ``layer_input`` is ``[B, in, H, W]`` for conv layers and ``[..., in]`` otherwise.
        ``where`` selects locations: a boolean or weight mask ``[B, H, W]`` (conv; resized
        to the layer's grid with :func:`resize_mask`) or ``[B, T]`` token positions; with
        weights, each key is scaled by its weight.
        """
        x = layer_input.detach()
        if self.kind in ("conv2d", "conv_transpose2d"):
            if x.ndim != 4:
                raise ValueError(f"a conv layer's input must be [B, C, H, W], got {tuple(x.shape)}")
            flat = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
            if where is not None:
                where = resize_mask(where, x.shape[-2:]).reshape(-1)
        else:
            flat = x.reshape(-1, x.shape[-1])
            if where is not None:
                where = where.reshape(-1)
        if flat.shape[1] != self.keys_dim:
            raise ValueError(f"keys have {flat.shape[1]} dims, the layer expects {self.keys_dim}")
        if where is None:
            return flat
        if where.numel() != flat.shape[0]:
            raise ValueError(
                f"location mask has {where.numel()} entries for {flat.shape[0]} key locations"
            )
        if where.dtype == torch.bool:
            return flat[where]
        keep = where > 0
        return flat[keep] * where[keep, None].to(flat.dtype)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a ``[B, H, W]`` location mask to the layer's grid (area-weighted)."""
    if mask.ndim != 3:
        raise ValueError(f"a location mask must be [B, H, W], got {tuple(mask.shape)}")
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    resized = nn.functional.adaptive_avg_pool2d(mask[:, None].float(), tuple(size))[:, 0]
    return resized > 0.5 if mask.dtype == torch.bool else resized


def memory_kind(module: nn.Module) -> str:
    """Name the associative-memory view that fits ``module``; error for other types."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.ConvTranspose2d):
        return "conv_transpose2d"
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return "conv1d_transposed"  # GPT-2 style: weight is [in, out]
    raise TypeError(
        f"{type(module).__name__} has no single linear map to rewrite; expected nn.Linear, "
        "nn.Conv2d, nn.ConvTranspose2d or a transposed Conv1D"
    )
