"""Train the demo generator on 32 x 32 procedural scenes (seeded, CPU, resumable).

    python -m nethook.gan.train_gan [--steps 3000] [--minutes 25] [--batch 32]
        [--checkpoint ~/.cache/nethook/gan/gan_ckpt.pt] [--out nethook/gan/scene_gan.pt]

A DCGAN: the generator of :mod:`nethook.gan.generator` against a spectral-norm
convolutional discriminator, non-saturating loss, Adam (2e-4, betas 0.5/0.999),
horizontal flips. The shipped weights are an exponential moving average of the
generator (decay 0.99). Every step draws its batch and z from a generator seeded
by ``(seed, step)``, and the full state is checkpointed every ``--every`` steps,
so a killed run resumes where it stopped (``--minutes`` bounds one invocation).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from nethook.gan.data import cache_dir, render, save_atomic
from nethook.gan.generator import WEIGHTS, Z_DIM, Generator


def discriminator() -> nn.Sequential:
    """Spectral-norm conv discriminator for 32 x 32 images in [-1, 1]."""
    return nn.Sequential(
        spectral_norm(nn.Conv2d(3, 32, 4, 2, 1)),
        nn.LeakyReLU(0.2),
        spectral_norm(nn.Conv2d(32, 64, 4, 2, 1)),
        nn.LeakyReLU(0.2),
        spectral_norm(nn.Conv2d(64, 128, 4, 2, 1)),
        nn.LeakyReLU(0.2),
        spectral_norm(nn.Conv2d(128, 1, 4)),
        nn.Flatten(),
    )


def _state(step, g, g_ema, d, opt_g, opt_d, seconds) -> dict:
    return {
        "step": step,
        "g": g.state_dict(),
        "g_ema": g_ema.state_dict(),
        "d": d.state_dict(),
        "opt_g": opt_g.state_dict(),
        "opt_d": opt_d.state_dict(),
        "seconds": seconds,
    }


def train(
    steps: int = 3000,
    minutes: float = 25.0,
    batch: int = 32,
    n: int = 8000,
    seed: int = 0,
    every: int = 25,
    checkpoint: Path | None = None,
    ema: float = 0.99,
) -> tuple[Generator, dict]:
    """Train (resuming from ``checkpoint`` if present); return the EMA generator and facts."""
    torch.manual_seed(seed)
    checkpoint = checkpoint or cache_dir() / "gan_ckpt.pt"
    data = render(n, 32, seed + 1)["image"]
    g, d = Generator(), discriminator()
    g_ema = copy.deepcopy(g).eval()
    opt_g = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    step, seconds = 0, 0.0
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=True)
        g.load_state_dict(state["g"])
        g_ema.load_state_dict(state["g_ema"])
        d.load_state_dict(state["d"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        step, seconds = int(state["step"]), float(state["seconds"])
        print(f"resumed at step {step} ({seconds:.0f} s trained)", flush=True)
    start = time.time()
    while step < steps and time.time() - start < minutes * 60:
        rng = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(len(data), (batch,), generator=rng)
        real = data[idx].float() / 127.5 - 1
        flip = torch.rand(batch, generator=rng) < 0.5
        real[flip] = real[flip].flip(-1)
        z = torch.randn(batch, Z_DIM, generator=rng)
        fake = g(z) * 2 - 1
        loss_d = F.softplus(-d(real)).mean() + F.softplus(d(fake.detach())).mean()
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        loss_g = F.softplus(-d(fake)).mean()
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        with torch.no_grad():
            for p_ema, p in zip(g_ema.parameters(), g.parameters(), strict=True):
                p_ema.lerp_(p, 1 - ema)
        step += 1
        if step % 10 == 0:
            print(f"step {step} loss_d {loss_d.item():.3f} loss_g {loss_g.item():.3f}", flush=True)
        if step % every == 0 or step == steps:
            elapsed = seconds + time.time() - start
            save_atomic(_state(step, g, g_ema, d, opt_g, opt_d, elapsed), checkpoint)
    seconds += time.time() - start
    save_atomic(_state(step, g, g_ema, d, opt_g, opt_d, seconds), checkpoint)
    facts = {"steps": step, "batch": batch, "train_images": n, "seed": seed, "seconds": seconds}
    return g_ema.eval(), facts


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="total training steps")
    parser.add_argument("--minutes", type=float, default=25.0, help="wall budget of this run")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--n", type=int, default=8000, help="training images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=25, help="checkpoint interval (steps)")
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, facts = train(
        args.steps, args.minutes, args.batch, args.n, args.seed, args.every, args.checkpoint
    )
    save_atomic(model.state_dict(), args.out)
    print(f"wrote {args.out}: {facts}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
