"""A small DCGAN-style generator of 32 x 32 scenes, the model ``nethook gandissect`` dissects.

``z [B, Z]`` (or ``[B, Z, 1, 1]``) -> image ``[B, 3, 32, 32]`` in [0, 1]. Named
blocks, each ending in a ReLU so their units are non-negative feature maps:

========  ===========================================  ==============
layer     what                                          output
========  ===========================================  ==============
layer1    4 x 4 transposed conv from z                  [B, 128, 4, 4]
layer2    upsample x2, conv 3 x 3                       [B, 64, 8, 8]
layer3    upsample x2, conv 3 x 3                       [B, 32, 16, 16]
layer4    upsample x2, conv 3 x 3                       [B, 16, 32, 32]
output    conv 3 x 3, tanh, mapped to [0, 1]            [B, 3, 32, 32]
========  ===========================================  ==============

Normalization is pixel norm (no batch statistics), so a sample does not depend on
the rest of its batch and interventions change only what they touch.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

WEIGHTS = Path(__file__).with_name("scene_gan.pt")
Z_DIM = 64
WIDTHS = (128, 64, 32, 16)
IMAGE_SIZE = 32


class PixelNorm(nn.Module):
    """Normalize each location's feature vector to unit root-mean-square (ProGAN)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class ToImage(nn.Module):
    """Map tanh outputs in [-1, 1] to images in [0, 1]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(x) + 1) / 2


class Generator(nn.Sequential):
    """DCGAN-style generator; ``z_dim`` is the latent size it expects."""

    def __init__(self, z_dim: int = Z_DIM, widths: tuple[int, ...] = WIDTHS) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["layer1"] = nn.Sequential(
            OrderedDict(
                conv=nn.ConvTranspose2d(z_dim, widths[0], 4),
                norm=PixelNorm(),
                relu=nn.ReLU(),
            )
        )
        for i in range(1, len(widths)):
            layers[f"layer{i + 1}"] = nn.Sequential(
                OrderedDict(
                    up=nn.Upsample(scale_factor=2, mode="nearest"),
                    conv=nn.Conv2d(widths[i - 1], widths[i], 3, padding=1),
                    norm=PixelNorm(),
                    relu=nn.ReLU(),
                )
            )
        layers["output"] = nn.Sequential(
            OrderedDict(conv=nn.Conv2d(widths[-1], 3, 3, padding=1), image=ToImage())
        )
        super().__init__(layers)
        self.z_dim = z_dim

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() == 2:
            z = z[:, :, None, None]
        if z.dim() != 4 or z.shape[1] != self.z_dim or z.shape[2:] != (1, 1):
            raise ValueError(
                f"generator: expected z of shape [B, {self.z_dim}] or [B, {self.z_dim}, 1, 1], "
                f"got {tuple(z.shape)}"
            )
        return super().forward(z)


def sample_z(n: int, seed: int = 0, z_dim: int = Z_DIM, device: str | torch.device = "cpu"):
    """``n`` standard normal latents ``[n, z_dim]``, a pure function of ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, z_dim, generator=gen).to(device)


def scene_gan(weights: str | Path | None = None) -> Generator:
    """The trained demo generator in eval mode (``load_model("nethook.gan.generator:scene_gan")``)."""
    path = Path(weights) if weights else WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(
            f"generator weights {path} not found; train them with `python -m nethook.gan.train_gan`"
        )
    model = Generator()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()
