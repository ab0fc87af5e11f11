"""Train the demo scene CNN on procedural scenes (seeded, CPU, a few minutes).

    python -m nethook.demo.train_scene_cnn [--train 4000] [--test 1000] [--epochs 8]
        [--out nethook/demo/scene_cnn.safetensors]

Images come from the ``scenes`` concept-source plugin (train and held-out sets drawn
with different seeds), the target is each image's whole-image ``scene`` label. The
run is deterministic for its arguments on one machine (fixed seeds, single
process); it writes the weights atomically and prints the held-out accuracy that
``MODEL_CARD.md`` quotes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from nethook.atomic import atomic_path
from nethook.demo.scene_cnn import INPUT_SIZE, SCENES, WEIGHTS, build


def render(spec: str, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Images of a scenes source as uint8 ``[N, 3, H, W]``, scene class indices ``[N]``, normalization."""
    from nethook_plugins.scenes.concepts import scene_id

    from nethook.plugins import get_source

    source = get_source(spec)
    scene_ids = {scene_id(name): i for i, name in enumerate(SCENES)}
    if sorted(scene_ids.values()) != list(range(len(SCENES))):
        raise ValueError(f"source {spec!r} does not publish the scenes {SCENES}")
    images = []
    targets = []
    for i in tqdm(range(len(source)), desc=f"render {spec}", disable=not progress):
        item = source[i]
        images.append((item["image"] * 255).round().to(torch.uint8))
        ids = [int(v) for v in item["image_labels"]["scene"] if int(v) in scene_ids]
        if len(ids) != 1:
            raise ValueError(f"image {i} of {spec!r} has scene labels {ids}, expected one")
        targets.append(scene_ids[ids[0]])
    return torch.stack(images), torch.tensor(targets), source.normalization


class Normalized:
    """uint8 images -> float images normalized with a source's (mean, std)."""

    def __init__(self, normalization: tuple) -> None:
        mean, std = normalization
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255 - self.mean) / self.std


def accuracy(
    model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor, prep: Normalized
) -> float:
    """Top-1 accuracy of ``model`` on uint8 images."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), 256):
            logits = model(prep(images[i : i + 256]))
            correct += int((logits.argmax(1) == targets[i : i + 256]).sum())
    return correct / len(images)


def train(
    train_n: int = 4000,
    test_n: int = 1000,
    epochs: int = 8,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> tuple[torch.nn.Module, dict]:
    """Train from scratch; return the model (eval mode) and a dict of facts for the model card."""
    torch.manual_seed(seed)
    size = INPUT_SIZE
    x_train, y_train, norm = render(f"scenes:n={train_n},size={size},seed={seed + 1}", progress)
    x_test, y_test, _ = render(f"scenes:n={test_n},size={size},seed={seed + 1000}", progress)
    prep = Normalized(norm)
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps = epochs * (train_n // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    start = time.time()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(train_n, generator=gen)
        total = 0.0
        bar = tqdm(
            range(train_n // batch_size), desc=f"epoch {epoch + 1}/{epochs}", disable=not progress
        )
        for b in bar:
            idx = order[b * batch_size : (b + 1) * batch_size]
            x = prep(x_train[idx])
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x[flip] = x[flip].flip(-1)
            loss = F.cross_entropy(model(x), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss)
            bar.set_postfix(loss=f"{total / (b + 1):.3f}")
    facts = {
        "train_images": train_n,
        "test_images": test_n,
        "epochs": epochs,
        "seed": seed,
        "input_size": size,
        "train_accuracy": accuracy(model, x_train[:2000], y_train[:2000], prep),
        "test_accuracy": accuracy(model, x_test, y_test, prep),
        "train_seconds": round(time.time() - start, 1),
        "normalization": norm,
        "class_balance_test": np.bincount(y_test.numpy(), minlength=len(SCENES)).tolist(),
    }
    return model.eval(), facts


def save(model: torch.nn.Module, path: Path) -> None:
    """Write the weights as safetensors, atomically."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=4000, help="training images")
    parser.add_argument("--test", type=int, default=1000, help="held-out images")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, facts = train(
        args.train, args.test, args.epochs, args.batch_size, args.lr, args.seed, not args.quiet
    )
    save(model, args.out)
    print(json.dumps(facts, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
