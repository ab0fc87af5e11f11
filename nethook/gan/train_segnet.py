"""Train the demo segmentation net on 32 x 32 procedural scenes (seeded, CPU, resumable).

    python -m nethook.gan.train_segnet [--steps 1500] [--minutes 15] [--batch 32]
        [--out nethook/gan/scene_segnet.pt]

Pixel labels come with the ``scenes`` source for free: object, part and material
class maps (:mod:`nethook.gan.data`). Loss: the sum of the three heads' pixel
cross-entropies; AdamW with a cosine schedule; horizontal flips. Batches and the
schedule are functions of ``(seed, step)`` and the state is checkpointed every
``--every`` steps, so a killed run resumes. At the end it measures pixel accuracy
and per-class IoU on held-out scenes (another seed) and writes them to
``scene_segnet.json`` beside the weights, the figures ``MODEL_CARD.md`` quotes.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nethook.gan.data import CATEGORIES, cache_dir, render, save_atomic, vocabulary
from nethook.gan.segnet import WEIGHTS, SegNet

NORMALIZATION = ((0.49, 0.56, 0.48), (0.31, 0.24, 0.32))


def prepare(images: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] images -> the normalized input the net expects."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    mean = torch.tensor(NORMALIZATION[0], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(NORMALIZATION[1], device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def evaluate(model: SegNet, data: dict[str, torch.Tensor]) -> dict:
    """Pixel accuracy per category and IoU per class (classes present in ``data``)."""
    model.eval()
    names = vocabulary()
    inter = {c: torch.zeros(len(names[c])) for c in CATEGORIES}
    union = {c: torch.zeros(len(names[c])) for c in CATEGORIES}
    correct = dict.fromkeys(CATEGORIES, 0)
    total = 0
    with torch.no_grad():
        for i in range(0, len(data["image"]), 256):
            out = model(prepare(data["image"][i : i + 256]))
            total += out["object"].shape[0] * out["object"].shape[2] * out["object"].shape[3]
            for c in CATEGORIES:
                pred, true = out[c].argmax(1), data[c][i : i + 256].long()
                correct[c] += int((pred == true).sum())
                k = len(names[c])
                both = torch.bincount((true * k + pred).flatten(), minlength=k * k).view(k, k)
                inter[c] += both.diag().float()
                union[c] += both.sum(0).float() + both.sum(1).float() - both.diag().float()
    result: dict = {"pixel_accuracy": {c: correct[c] / total for c in CATEGORIES}, "iou": {}}
    for c in CATEGORIES:
        result["iou"][c] = {
            names[c][j]: round(float(inter[c][j] / union[c][j]), 4)
            for j in range(1, len(names[c]))
            if union[c][j] > 0
        }
        values = list(result["iou"][c].values())
        result.setdefault("mean_iou", {})[c] = round(sum(values) / max(len(values), 1), 4)
    return result


def train(
    steps: int = 1500,
    minutes: float = 15.0,
    batch: int = 32,
    n: int = 8000,
    seed: int = 0,
    every: int = 50,
    checkpoint: Path | None = None,
    lr: float = 3e-3,
) -> tuple[SegNet, dict]:
    """Train (resuming from ``checkpoint``); return the model and its step count and time."""
    torch.manual_seed(seed)
    checkpoint = checkpoint or cache_dir() / "segnet_ckpt.pt"
    data = render(n, 32, seed + 1)
    model = SegNet()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    step, seconds = 0, 0.0
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, seconds = int(state["step"]), float(state["seconds"])
        print(f"resumed at step {step}", flush=True)
    start = time.time()
    model.train()
    while step < steps and time.time() - start < minutes * 60:
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        rng = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(len(data["image"]), (batch,), generator=rng)
        flip = torch.rand(batch, generator=rng) < 0.5
        x = data["image"][idx]
        x[flip] = x[flip].flip(-1)
        out = model(prepare(x))
        loss = 0.0
        for c in CATEGORIES:
            y = data[c][idx].long()
            y[flip] = y[flip].flip(-1)
            loss = loss + F.cross_entropy(out[c], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 10 == 0:
            print(f"step {step} loss {loss.item():.3f}", flush=True)
        if step % every == 0:
            elapsed = seconds + time.time() - start
            state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step}
            save_atomic({**state, "seconds": elapsed}, checkpoint)
    seconds += time.time() - start
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step}
    save_atomic({**state, "seconds": seconds}, checkpoint)
    return model.eval(), {"steps": step, "batch": batch, "train_images": n, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--minutes", type=float, default=15.0, help="wall budget of this run")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--n", type=int, default=8000, help="training images")
    parser.add_argument("--test", type=int, default=1000, help="held-out images (seed 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, facts = train(
        args.steps, args.minutes, args.batch, args.n, args.seed, 50, args.checkpoint
    )
    save_atomic(model.state_dict(), args.out)
    facts["held_out"] = evaluate(model, render(args.test, 32, 1000))
    facts["test_images"] = args.test
    card = args.out.with_suffix(".json")
    tmp = card.with_name(f".{card.name}.tmp")
    tmp.write_text(json.dumps(facts, indent=1))
    tmp.replace(card)
    print(json.dumps(facts, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
