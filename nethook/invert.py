"""Layer-wise GAN inversion: find the ``z`` and layer representation ``r`` behind an image.

The generator is a chain of stages ``G = g_N(...g_1(z))`` (the children of an
``nn.Sequential``, or a list of layer names). Following METHODS.md §3:

1. :func:`train_encoder` trains one small inverter ``e_i`` per stage on the
   generator's own samples, ``|r_{i-1} - e_i(g_i(r_{i-1}))|_1 +
   lambda_R |r_i - g_i(e_i(r_i))|_1`` (``lambda_R = 0.01``), composes them into
   ``E = e_1(...e_N(x))`` and fine-tunes ``E`` jointly. Training is resumable:
   checkpoints are keyed by a content hash of the generator weights, the stage
   and the settings, so a changed generator never resumes a stale inverter.
2. :func:`invert` splits ``G = G_f(g_n(...g_1(z)))`` at a layer, starts from
   ``z0 = E(x)`` and optimizes perturbations ``delta_i`` of the stages up to that
   layer, ``r = delta_n + g_n(...delta_1 + g_1(z0))``, to minimize
   ``|x - G_f(r)|_1 + lambda_V |V(x) - V(G_f(r))|_1 + lambda_reg sum_i |delta_i|_2^2``
   (norms are sums over elements, per image)
   (``V``: a perceptual feature network, :class:`FeatureNet`).
3. :func:`inversion_correlations` measures, on generated images whose ``z`` and
   ``r`` are known, how well (a) optimizing ``z`` alone, (b) the encoder alone and
   (c) the full method recover ``z``, ``r`` and ``x``.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from torch import nn
from tqdm.auto import tqdm

from nethook.atomic import atomic_path
from nethook.models import model_device

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_FEATURES = "nethook.demo.scene_cnn:scene_cnn"
SHIPPED = Path(__file__).with_name("gan")  # trained encoders shipped with nethook, by content key


# ---------------------------------------------------------------------------
# The generator as a chain of stages


class Chain:
    """A generator seen as named stages ``g_1 ... g_N`` applied in order.

    ``generator`` is an ``nn.Sequential`` (its children are the stages) or any
    module with ``layers``, a list of names of submodules that chain. ``z`` of
    shape ``[B, Z]`` is reshaped to ``[B, Z, 1, 1]`` when the first stage is
    convolutional.
    """

    def __init__(self, generator: nn.Module, layers: Sequence[str] | None = None) -> None:
        modules = dict(generator.named_modules())
        if layers is None:
            if not isinstance(generator, nn.Sequential):
                raise ValueError(
                    f"{type(generator).__name__} is not an nn.Sequential; pass layers=[...] "
                    "naming the submodules that chain z to the image"
                )
            layers = [name for name, _ in generator.named_children()]
        missing = [name for name in layers if name not in modules]
        if missing:
            raise ValueError(f"generator has no layers {missing}; it has {sorted(modules)[:20]}")
        self.generator = generator
        self.names = list(layers)
        self.stages = [modules[name] for name in self.names]
        self.z_dim = getattr(generator, "z_dim", None)

    def index(self, layer: str) -> int:
        """Position of ``layer`` among the stages (``ValueError`` naming them if absent)."""
        if layer not in self.names:
            raise ValueError(
                f"layer {layer!r} is not a stage of the generator; stages: {self.names}"
            )
        return self.names.index(layer)

    def prepare_z(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` in the shape the first stage takes."""
        kinds = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
        first = next((m for m in self.stages[0].modules() if isinstance(m, kinds)), None)
        if z.dim() == 2 and isinstance(first, (nn.Conv2d, nn.ConvTranspose2d)):
            return z[:, :, None, None]
        return z

    def forward_from(self, r: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
        """Apply stages ``start .. stop-1`` (0-based) to ``r``."""
        for stage in self.stages[start:stop]:
            r = stage(r)
        return r

    def representations(self, z: torch.Tensor) -> list[torch.Tensor]:
        """``[r_0 = z, r_1, ..., r_N = x]``."""
        rs = [self.prepare_z(z)]
        for stage in self.stages:
            rs.append(stage(rs[-1]))
        return rs

    def sample_z(self, n: int, seed: int, device: Any = "cpu") -> torch.Tensor:
        """``n`` standard normal latents, a pure function of ``seed``."""
        if self.z_dim is None:
            raise ValueError("generator has no z_dim attribute; set generator.z_dim")
        rng = torch.Generator().manual_seed(seed)
        return torch.randn(n, self.z_dim, generator=rng).to(device)


def check_image_size(chain: Chain, images: torch.Tensor) -> None:
    """Raise ``ValueError`` naming both sizes if ``images`` are not the generator's size."""
    device = model_device(chain.generator)
    with torch.no_grad():
        probe = chain.representations(chain.sample_z(1, 0, device))[-1]
    if tuple(images.shape[1:]) != tuple(probe.shape[1:]):
        raise ValueError(
            f"images of shape {tuple(images.shape[1:])} cannot be produced by the generator, "
            f"which makes {tuple(probe.shape[1:])}; resize the images to "
            f"{tuple(probe.shape[-2:])}"
        )


# ---------------------------------------------------------------------------
# Inverters and the composed encoder


class StageInverter(nn.Module):
    """A small network mapping a stage's output ``r_i`` back to its input ``r_{i-1}``.

    Flat or ``1 x 1`` inputs get an MLP; feature maps get conv, ReLU, resize to
    the input's size, conv.
    """

    def __init__(
        self, in_shape: Sequence[int], out_shape: Sequence[int], hidden: int = 128
    ) -> None:
        super().__init__()
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(out_shape)
        flat_in = len(in_shape) == 1 or tuple(in_shape[1:]) == (1, 1)
        if flat_in or len(out_shape) == 1:
            self.net = nn.Sequential(
                nn.Flatten(),
                nn.Linear(int(np.prod(out_shape)), hidden * 4),
                nn.LeakyReLU(0.2),
                nn.Linear(hidden * 4, int(np.prod(in_shape))),
            )
            self.conv = False
        else:
            c_in, c_out = in_shape[0], out_shape[0]
            width = max(hidden // 2, c_in, 16)
            self.first = nn.Conv2d(c_out, width, 3, padding=1)
            self.second = nn.Conv2d(width, width, 3, padding=1)
            self.last = nn.Conv2d(width, c_in, 3, padding=1)
            self.conv = True

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        if not self.conv:
            return self.net(r).reshape(-1, *self.in_shape)
        h = F.leaky_relu(self.first(r), 0.2)
        if tuple(h.shape[-2:]) != tuple(self.in_shape[1:]):
            h = F.interpolate(h, size=self.in_shape[1:], mode="bilinear", align_corners=False)
        h = F.leaky_relu(self.second(h), 0.2)
        return self.last(h)


class LayerwiseEncoder(nn.Module):
    """``E = e_1(...e_N(x))``: the stage inverters composed, image -> ``z``."""

    def __init__(self, inverters: Sequence[StageInverter]) -> None:
        super().__init__()
        self.inverters = nn.ModuleList(inverters)

    def estimates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[r_0, ..., r_{N-1}]`` estimated from ``x`` (``r_0`` is ``z``)."""
        out = [x]
        for inv in reversed(self.inverters):
            out.append(inv(out[-1]))
        return out[::-1][:-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.estimates(x)[0]


@dataclass(frozen=True)
class TrainSettings:
    """How inverters are trained (part of every checkpoint's content key).

    ``steps`` is per stage: one number for all, or one per stage (inverters of
    small early stages are cheap and take many steps). ``lambda_g`` weighs, in the joint phase, the L1 distance between the true
    representations and those the generator makes from the estimated ``z`` (what
    the encoder-alone measurement compares). ``cosine`` decays the learning rate
    of each phase from ``lr`` to 0 along a half cosine (a function of the step,
    so resumed training follows the same schedule).
    """

    steps: int | tuple[int, ...] = 2000
    joint_steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    lambda_r: float = 0.01
    lambda_g: float = 1.0
    cosine: bool = True
    hidden: int = 128
    seed: int = 0


def _shapes(chain: Chain) -> list[tuple[int, ...]]:
    device = model_device(chain.generator)
    with torch.no_grad():
        return [tuple(r.shape[1:]) for r in chain.representations(chain.sample_z(1, 0, device))]


def _save(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)


def _load(path: Path, key: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
        return None
    return state if isinstance(state, dict) and state.get("key") == key else None


def _load_finished(
    encoder: LayerwiseEncoder,
    folders: Sequence[Path | None],
    name: str,
    key: str,
    settings: TrainSettings,
) -> bool:
    """Load a fully trained encoder saved as ``folder/name`` under ``key`` into ``encoder``.

    The first folder holding one wins (the checkpoint directory, then the
    encoders shipped with nethook, :data:`SHIPPED`); returns whether one did.
    """
    for folder in folders:
        state = _load(folder / name, key) if folder is not None else None
        if state is not None and state["step"] >= settings.joint_steps:
            encoder.load_state_dict(state["module"])
            return True
    return False


def ship_encoder(
    encoder: LayerwiseEncoder,
    generator: nn.Module,
    settings: TrainSettings,
    folder: str | os.PathLike = "",
    layers: Sequence[str] | None = None,
) -> Path:
    """Save a finished ``encoder`` slim (float16 weights, no optimizer) under its content key.

    :func:`train_encoder` with the same generator weights, layers and
    ``settings`` then loads it from ``folder`` (default :data:`SHIPPED`) instead
    of training. Returns the path written (atomically).
    """
    from nethook.hashing import content_key, hash_model

    chain = Chain(generator, layers)
    model = hash_model(generator)
    key = content_key(model=model, stage="joint", layers=chain.names, settings=asdict(settings))
    module = {k: v.detach().cpu().half() for k, v in encoder.state_dict().items()}
    path = Path(folder or SHIPPED) / f"encoder-{key[:16]}.pt"
    state = {"key": key, "step": settings.joint_steps, "module": module, "model": model,
             "layers": chain.names, "settings": asdict(settings)}  # fmt: skip
    _save(path, state)
    return path


def shipped_settings(
    generator: nn.Module, layers: Sequence[str] | None = None, folder: str | os.PathLike = ""
) -> TrainSettings | None:
    """The settings of an encoder shipped for exactly these generator weights, or None.

    With them :func:`train_encoder` loads that encoder instead of training.
    """
    from nethook.hashing import hash_model

    names = Chain(generator, layers).names
    model = hash_model(generator)
    for path in sorted(Path(folder or SHIPPED).glob("encoder-*.pt")):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
            continue
        if state.get("model") == model and list(state.get("layers", ())) == names:
            fields = {
                k: tuple(v) if isinstance(v, list) else v for k, v in state["settings"].items()
            }
            return TrainSettings(**fields)
    return None


def _train_loop(
    name: str,
    params: Sequence[nn.Parameter],
    loss_fn: Any,
    steps: int,
    settings: TrainSettings,
    checkpoint: Path | None,
    key: str,
    module: nn.Module,
    save_every: int,
    progress: bool,
    stop_after: int | None,
) -> tuple[bool, int]:
    """Adam on ``loss_fn(step)``, resuming from and saving to ``checkpoint``.

    Returns (finished, steps run now)."""
    opt = torch.optim.Adam(params, lr=settings.lr)
    start = 0
    state = _load(checkpoint, key) if checkpoint else None
    if state is not None:
        module.load_state_dict(state["module"])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
    done_now = 0
    for step in tqdm(range(start, steps), desc=name, disable=not progress, initial=start,
                     total=steps):  # fmt: skip
        if stop_after is not None and done_now >= stop_after:
            break
        for group in opt.param_groups:
            group["lr"] = _learning_rate(settings, step, steps)
        opt.zero_grad()
        loss_fn(step).backward()
        opt.step()
        done_now += 1
        if checkpoint and (step + 1) % save_every == 0:
            _save(checkpoint, _state(key, step + 1, module, opt))
    if checkpoint and done_now:
        _save(checkpoint, _state(key, start + done_now, module, opt))
    return start + done_now >= steps, done_now


def _stage_steps(settings: TrainSettings, chain: Chain) -> list[int]:
    """Training steps of each stage's inverter (``ValueError`` if the count does not fit)."""
    steps = settings.steps
    if isinstance(steps, int):
        return [steps] * len(chain.names)
    if len(steps) != len(chain.names):
        raise ValueError(
            f"TrainSettings.steps gives {len(steps)} step counts, but the generator has "
            f"{len(chain.names)} stages {chain.names}"
        )
    return [int(s) for s in steps]


def _learning_rate(settings: TrainSettings, step: int, steps: int) -> float:
    """``settings.lr``, decayed along a half cosine over ``steps`` if ``settings.cosine``."""
    if not settings.cosine:
        return settings.lr
    return settings.lr * 0.5 * (1 + math.cos(math.pi * step / steps))


def _state(key: str, step: int, module: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {"key": key, "step": step, "module": module.state_dict(), "optimizer": opt.state_dict()}


def train_encoder(
    generator: nn.Module,
    layers: Sequence[str] | None = None,
    settings: TrainSettings | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    *,
    save_every: int = 100,
    progress: bool = True,
    stop_after: int | None = None,
) -> LayerwiseEncoder:
    """Train the per-stage inverters, compose them and fine-tune jointly (module docstring).

    With ``checkpoint_dir`` each phase saves ``inverter-<stage>-<key>.pt`` (and
    ``encoder-<key>.pt``) every ``save_every`` steps and resumes from it; keys are
    ``content_key`` of the generator weights, the stage and ``settings``.
    ``stop_after`` ends training after that many steps in total (to test
    resumption); the returned encoder is then partly trained.
    """
    from nethook.hashing import content_key, hash_model

    settings = settings or TrainSettings()
    chain = Chain(generator, layers)
    for p in generator.parameters():
        p.requires_grad_(False)
    device = model_device(generator)
    shapes = _shapes(chain)
    torch.manual_seed(settings.seed)
    inverters = [
        StageInverter(shapes[i], shapes[i + 1], settings.hidden).to(device)
        for i in range(len(chain.stages))
    ]
    model_hash = hash_model(generator)
    ckdir = Path(checkpoint_dir) if checkpoint_dir else None
    budget = stop_after
    encoder = LayerwiseEncoder(inverters)
    joint = content_key(
        model=model_hash, stage="joint", layers=chain.names, settings=asdict(settings)
    )
    if _load_finished(encoder, [ckdir, SHIPPED], f"encoder-{joint[:16]}.pt", joint, settings):
        return encoder

    stage_steps = _stage_steps(settings, chain)

    def batch_z(step: int, phase: int) -> torch.Tensor:
        seed = (settings.seed * 1_000_003 + phase * 100_003 + step) % (2**63)
        return chain.sample_z(settings.batch_size, seed, device)

    for i, (name, stage, inv) in enumerate(zip(chain.names, chain.stages, inverters, strict=True)):
        key = content_key(model=model_hash, stage=name, index=i, layers=chain.names,
                          settings=asdict(settings))  # fmt: skip

        def loss_fn(step: int, i: int = i, stage: nn.Module = stage, inv: nn.Module = inv):
            with torch.no_grad():
                r_prev = chain.forward_from(chain.prepare_z(batch_z(step, i + 1)), 0, i)
                r = stage(r_prev)
            back = (r_prev - inv(r)).abs().mean()
            forward = (r - stage(inv(r))).abs().mean()
            return back + settings.lambda_r * forward

        path = ckdir / f"inverter-{name}-{key[:16]}.pt" if ckdir else None
        finished, ran = _train_loop(
            f"inverter {name}", list(inv.parameters()), loss_fn, stage_steps[i], settings, path,
            key, inv, save_every, progress, budget,
        )  # fmt: skip
        if budget is not None:
            budget -= ran
        if not finished:
            return encoder

    def joint_loss(step: int) -> torch.Tensor:
        with torch.no_grad():
            rs = chain.representations(batch_z(step, 0))
        est = encoder.estimates(rs[-1])
        loss = sum((a - b).abs().mean() for a, b in zip(est, rs[:-1], strict=True))
        made = chain.representations(est[0])
        if settings.lambda_g:
            pairs = zip(made[1:-1], rs[1:-1], strict=True)
            loss = loss + settings.lambda_g * sum((a - b).abs().mean() for a, b in pairs)
        return loss + settings.lambda_r * (made[-1] - rs[-1]).abs().mean()

    path = ckdir / f"encoder-{joint[:16]}.pt" if ckdir else None
    _train_loop(
        "joint", list(encoder.parameters()), joint_loss, settings.joint_steps, settings, path,
        joint, encoder, save_every, progress, budget,
    )  # fmt: skip
    return encoder


# ---------------------------------------------------------------------------
# Perceptual features


class FeatureNet(nn.Module):
    """``V``: the activations of ``layer`` of a network given by spec, for perceptual losses.

    Images in [0, 1] are resized to ``size`` and normalized with ``mean``/``std``
    (ImageNet's by default, what the demo scene CNN expects).
    """

    def __init__(
        self,
        spec: str | nn.Module = DEFAULT_FEATURES,
        layer: str = "block2",
        size: int | None = 64,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        from nethook.models import load_model

        self.model = load_model(spec) if isinstance(spec, str) else spec
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.layer = layer
        self.size = size
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from nethook.trace import Trace

        x = images
        if self.size and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        with Trace(self.model, self.layer, stop=True) as tr:
            self.model(x)
        return tr.output


# ---------------------------------------------------------------------------
# Per-image optimization


@dataclass
class Inversion:
    """What an inversion recovered: ``z``, ``r`` at the split layer and the image ``x``."""

    z: torch.Tensor
    r: torch.Tensor
    x: torch.Tensor


def _image_loss(
    recon: torch.Tensor, x: torch.Tensor, features: nn.Module | None, lambda_v: float,
    target_features: torch.Tensor | None,
) -> torch.Tensor:  # fmt: skip
    loss = (recon - x).abs().flatten(1).sum(1)
    if features is not None and lambda_v:
        loss = loss + lambda_v * (features(recon) - target_features).abs().flatten(1).sum(1)
    return loss


def invert(
    generator: nn.Module,
    encoder: LayerwiseEncoder,
    x: torch.Tensor,
    layer: str,
    *,
    layers: Sequence[str] | None = None,
    features: nn.Module | None = None,
    lambda_v: float = 1.0,
    lambda_reg: float = 1.0,
    steps: int = 300,
    lr: float = 0.01,
    z_steps: int = 0,
    z_lr: float = 0.1,
    progress: bool = False,
) -> Inversion:
    """The full method: ``z0 = E(x)``, then optimize ``delta_i`` of the stages up to ``layer``.

    Each image's loss is independent (per-image sums), so a batch inverts its
    images separately. With ``z_steps``, ``z0`` is first refined by that many
    steps of optimizing ``z`` itself (:func:`invert_z` from ``E(x)``, rate
    ``z_lr``): moving ``z`` moves every layer along the generator's own manifold,
    where the ``delta_i`` only reach the directions of ``r`` the image reveals.
    Returns ``z0``, the optimized ``r`` at ``layer`` and ``G_f(r)``.
    """
    chain = Chain(generator, layers)
    check_image_size(chain, x)
    k = chain.index(layer) + 1
    with torch.no_grad():
        z0 = encoder(x)
    if z_steps:
        z0 = invert_z(generator, x, layer, layers=layers, features=features, lambda_v=lambda_v,
                      steps=z_steps, lr=z_lr, z_init=z0, progress=progress).z  # fmt: skip
    with torch.no_grad():
        base = [chain.prepare_z(z0)]
        for stage in chain.stages[:k]:
            base.append(stage(base[-1]))
        target = features(x) if features is not None and lambda_v else None
    deltas = [torch.zeros_like(r, requires_grad=True) for r in base[1:]]
    opt = torch.optim.Adam(deltas, lr=lr)

    def forward() -> torch.Tensor:
        r = base[0]
        for stage, delta in zip(chain.stages[:k], deltas, strict=True):
            r = stage(r) + delta
        return r

    for _ in tqdm(range(steps), desc="invert", disable=not progress):
        opt.zero_grad()
        recon = chain.forward_from(forward(), k)
        loss = _image_loss(recon, x, features, lambda_v, target).sum()
        loss = loss + lambda_reg * sum(d.pow(2).sum() for d in deltas)
        loss.backward()
        opt.step()
    with torch.no_grad():
        r = forward()
        return Inversion(z=base[0], r=r, x=chain.forward_from(r, k))


def invert_z(
    generator: nn.Module,
    x: torch.Tensor,
    layer: str,
    *,
    layers: Sequence[str] | None = None,
    features: nn.Module | None = None,
    lambda_v: float = 1.0,
    steps: int = 300,
    lr: float = 0.05,
    cosine: bool = True,
    z_init: torch.Tensor | None = None,
    progress: bool = False,
) -> Inversion:
    """Baseline (a): optimize ``z`` directly (from ``z_init``, default 0) to reconstruct ``x``.

    Adam at rate ``lr``, decayed to 0 along a half cosine if ``cosine`` (the last
    steps settle instead of jittering at the full rate).
    """
    chain = Chain(generator, layers)
    check_image_size(chain, x)
    k = chain.index(layer) + 1
    with torch.no_grad():
        target = features(x) if features is not None and lambda_v else None
    z = (z_init.clone() if z_init is not None else torch.zeros(len(x), chain.z_dim)).to(x.device)
    z = chain.prepare_z(z).detach().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    for step in tqdm(range(steps), desc="invert z", disable=not progress):
        if cosine:
            opt.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad()
        recon = chain.forward_from(z, 0)
        _image_loss(recon, x, features, lambda_v, target).sum().backward()
        opt.step()
    with torch.no_grad():
        r = chain.forward_from(z, 0, k)
        return Inversion(z=z.detach(), r=r, x=chain.forward_from(r, k))


def encode(
    generator: nn.Module, encoder: LayerwiseEncoder, x: torch.Tensor, layer: str,
    layers: Sequence[str] | None = None,
) -> Inversion:  # fmt: skip
    """Baseline (b): the encoder alone, ``z = E(x)``, ``r`` and ``x`` generated from it."""
    chain = Chain(generator, layers)
    check_image_size(chain, x)
    k = chain.index(layer) + 1
    with torch.no_grad():
        z = encoder(x)
        r = chain.forward_from(z, 0, k)
        return Inversion(z=z, r=r, x=chain.forward_from(r, k))


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each image's flattened ``a`` and ``b`` (``[B]``)."""
    a = a.flatten(1).double()
    b = b.flatten(1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)


def pooled_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of all elements of ``a`` and ``b`` together (images, units, pixels).

    The thesis's measure: one scatter of every recovered value against the true
    one, so differences between images and between units count too.
    """
    a = a.flatten().double()
    b = b.flatten().double()
    if a.shape != b.shape:
        raise ValueError(f"pooled_correlation: {a.numel()} values vs {b.numel()}")
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30))


def inversion_correlations(
    generator: nn.Module,
    encoder: LayerwiseEncoder,
    layer: str,
    n: int = 16,
    *,
    seed: int = 10_000,
    layers: Sequence[str] | None = None,
    features: nn.Module | None = None,
    lambda_v: float = 1.0,
    lambda_reg: float = 1.0,
    steps: int = 300,
    lr: float = 0.01,
    z_steps: int = 3000,
    z_lr: float = 0.1,
    progress: bool = False,
) -> xr.DataArray:
    """Correlation with the truth, dims ``approach`` x ``quantity`` (z, r, x) x ``measure``.

    Approaches, on ``n`` generated images from latents of ``seed`` (not a
    training seed): ``z_optimization`` (a, :func:`invert_z`), ``encoder`` (b,
    :func:`encode`), ``full`` (c, :func:`invert` with ``steps`` and ``lr``) and
    ``full_z`` (c with ``z`` refined first, ``z_steps`` of :func:`invert_z` from
    ``E(x)`` at rate ``z_lr``); (a) gets ``steps + z_steps`` steps at ``z_lr``,
    as many as ``full_z`` has in all. Measures: ``pooled``, all values of all
    images in one correlation (:func:`pooled_correlation`, the thesis's), and
    ``per_image``, the mean of each image's correlation (:func:`correlation`).
    """
    chain = Chain(generator, layers)
    k = chain.index(layer) + 1
    device = model_device(generator)
    with torch.no_grad():
        rs = chain.representations(chain.sample_z(n, seed, device))
    truth = Inversion(z=rs[0], r=rs[k], x=rs[-1])
    x = truth.x
    kw = {"layers": layers, "features": features, "lambda_v": lambda_v, "steps": steps,
          "progress": progress}  # fmt: skip
    full = {"lambda_reg": lambda_reg, "lr": lr, **kw}
    results = {
        "z_optimization": invert_z(
            generator, x, layer, **{**kw, "steps": steps + z_steps, "lr": z_lr}
        ),  # fmt: skip
        "encoder": encode(generator, encoder, x, layer, layers),
        "full": invert(generator, encoder, x, layer, **full),
        "full_z": invert(generator, encoder, x, layer, z_steps=z_steps, z_lr=z_lr, **full),
    }
    quantities = ("z", "r", "x")
    values = np.empty((len(results), len(quantities), 2))
    for i, res in enumerate(results.values()):
        for j, q in enumerate(quantities):
            got, want = getattr(res, q), getattr(truth, q)
            got = got.reshape(want.shape)
            values[i, j] = pooled_correlation(got, want), float(correlation(got, want).mean())
    return xr.DataArray(
        values,
        dims=("approach", "quantity", "measure"),
        coords={
            "approach": list(results),
            "quantity": list(quantities),
            "measure": ["pooled", "per_image"],
        },  # fmt: skip
        name="correlation",
        attrs={
            "layer": layer,
            "samples": n,
            "seed": seed,
            "steps": steps,
            "lr": lr,
            "z_steps": z_steps,
        },  # fmt: skip
    )


# ---------------------------------------------------------------------------
# Omissions: real images the generator cannot draw


def rich_in(
    source: Any,
    segmenter: Any,
    classes: Sequence[str],
    n: int = 8,
    *,
    category: str = "object",
    scan: int = 200,
    batch_size: int = 50,
) -> list[int]:
    """Indices of the ``n`` images among the first ``scan`` of ``source`` richest in ``classes``.

    Richness is the share of pixels the segmenter gives any of ``classes``.
    """
    from nethook.fsd import class_fractions, class_table, real_batches

    table = class_table(segmenter, category).set_index("name")
    unknown = sorted(set(classes) - set(table.index))
    if unknown:
        raise ValueError(f"classes {unknown} are not {category} classes of the segmenter")
    ids = [int(table.loc[c, "id"]) for c in classes]
    scan = min(scan, len(source))
    scores = []
    with torch.no_grad():
        for images in real_batches(source, list(range(scan)), batch_size):
            scores.append(class_fractions(segmenter, images, ids, category).sum(1))
    order = torch.argsort(torch.cat(scores), descending=True, stable=True)
    return [int(i) for i in order[:n]]


def _colorize(labels: torch.Tensor) -> np.ndarray:
    rng = np.random.default_rng(7)
    palette = rng.integers(40, 255, size=(4096, 3), dtype=np.uint8)
    palette[0] = 0
    return palette[labels.cpu().numpy() % 4096]


def omission_page(
    real: torch.Tensor,
    recon: torch.Tensor,
    segmenter: Any | None,
    out: str | os.PathLike,
    *,
    category: str = "object",
    title: str = "What the generator cannot draw",
) -> Path:
    """Write ``out/index.html`` + ``out/img/omissions.png``: real | reconstruction | segmentations.

    Without a ``segmenter`` only the real and reconstructed columns are drawn.
    """
    from PIL import Image

    from nethook.fsd import write_text

    out = Path(out)
    (out / "img").mkdir(parents=True, exist_ok=True)
    to8 = lambda t: (t.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).astype(np.uint8)  # noqa: E731
    cols = [to8(real), to8(recon)]
    if segmenter is not None:
        with torch.no_grad():
            cols.append(_colorize(segmenter.segment(real)[category][:, 0]))
            cols.append(_colorize(segmenter.segment(recon.clamp(0, 1))[category][:, 0]))
    rows = [np.concatenate([c[i] for c in cols], axis=1) for i in range(len(real))]
    grid = np.concatenate(rows, axis=0)
    scale = max(1, 128 // real.shape[-1])
    img = Image.fromarray(grid).resize(
        (grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST
    )
    with atomic_path(out / "img" / "omissions.png", suffix=".png") as tmp:
        img.save(tmp)
    columns = "real | reconstruction"
    if segmenter is not None:
        columns += " | segmentation of real | segmentation of reconstruction"
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head><body>"
        f"<h2>{title}</h2><p>Columns: {columns}.</p><img src='img/omissions.png' alt='omissions'>"
        "</body></html>"
    )
    return write_text(out / "index.html", page)
