"""A small scene-classification CNN, the model ``nethook demo`` dissects.

Four conv blocks (conv 3 x 3, batch norm, ReLU), max pooling between them, global
average pooling and a linear classifier over the ``scenes`` plugin's scene classes.
It is one ``nn.Sequential`` of named modules, so its layers are ``block1`` ...
``block4`` and their receptive-field geometry is known exactly
(:func:`nethook.upsample.infer_geometry`). Like any model trained on a concept
source, it expects images normalized with that source's ``normalization``
(ImageNet mean and std for ``scenes``).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from torch import nn

WEIGHTS = Path(__file__).with_name("scene_cnn.safetensors")
SCENES = ("street", "farm", "beach", "forest", "park", "kitchen")
WIDTHS = (16, 32, 64, 128)
INPUT_SIZE = 64


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            bn=nn.BatchNorm2d(c_out),
            relu=nn.ReLU(inplace=False),
        )
    )


def build(num_classes: int = len(SCENES), widths: tuple[int, ...] = WIDTHS) -> nn.Sequential:
    """The untrained architecture (the training script and the factory share it)."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    c_in = 3
    for i, width in enumerate(widths, start=1):
        layers[f"block{i}"] = _block(c_in, width)
        if i < len(widths):
            layers[f"pool{i}"] = nn.MaxPool2d(2)
        c_in = width
    layers["gap"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(c_in, num_classes)
    return nn.Sequential(layers)


def scene_cnn(weights: str | Path | None = None) -> nn.Sequential:
    """The trained demo model in eval mode (``load_model("nethook.demo.scene_cnn:scene_cnn")``).

    Loads ``weights`` (a safetensors file) or the shipped ``scene_cnn.safetensors``.
    """
    from safetensors.torch import load_file

    path = Path(weights) if weights else WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(
            f"demo weights {path} not found; train them with "
            "`python -m nethook.demo.train_scene_cnn`"
        )
    model = build()
    model.load_state_dict(load_file(str(path)))
    return model.eval()
