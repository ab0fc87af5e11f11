"""Overhead of the trace engine on ResNet-18 (CPU, ``torch.no_grad()``).

Variants run interleaved (one of each per round, so shared-core noise hits them
alike) and are reported as medians and ratios to the bare forward pass:

- bare forward
- ``Trace`` retaining ``layer4``                      (goal <= 1.03x)
- ``TraceDict`` retaining every leaf module           (goal <= 1.15x)
- ``Trace(..., "layer2", stop=True)``                 (should be well below 1x)

Run: ``.venv/bin/python benchmarks/bench_trace.py [--batch 32] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torchvision

from nethook import Trace, TraceDict


def leaf_names(model: torch.nn.Module) -> list[str]:
    """Paths of the modules that have no children."""
    return [name for name, m in model.named_modules() if name and not list(m.children())]


def hook_cost_us(rounds: int, width: int = 200) -> tuple[float, float]:
    """Microseconds a retaining hook adds per module call: (Trace hook, bare call).

    Measured on ``width`` Identity modules and a tiny tensor, where the hook is
    all there is to time; interleaved, medians.
    """
    model = torch.nn.Sequential(*[torch.nn.Identity() for _ in range(width)])
    names = [str(i) for i in range(width)]
    x = torch.zeros(1)
    bare, traced = [], []
    for _ in range(rounds * 20):
        start = time.perf_counter()
        model(x)
        bare.append(time.perf_counter() - start)
        with TraceDict(model, names):
            start = time.perf_counter()
            model(x)
            traced.append(time.perf_counter() - start)
    per_call = statistics.median(bare) / width * 1e6
    return (statistics.median(traced) - statistics.median(bare)) / width * 1e6, per_call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    leaves = leaf_names(model)

    def bare() -> None:
        model(x)

    def one_layer() -> None:
        with Trace(model, "layer4"):
            model(x)

    def every_leaf() -> None:
        with TraceDict(model, leaves):
            model(x)

    def stop_layer2() -> None:
        with Trace(model, "layer2", stop=True):
            model(x)

    variants: dict[str, Callable[[], None]] = {
        "bare forward": bare,
        "Trace layer4": one_layer,
        f"TraceDict {len(leaves)} leaves": every_leaf,
        "stop=True at layer2": stop_layer2,
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        for fn in variants.values():  # warm-up
            fn()
        for _ in range(args.rounds):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)

    base = statistics.median(times["bare forward"])
    hook_us, call_us = hook_cost_us(args.rounds)
    with torch.no_grad(), TraceDict(model, leaves) as td:
        model(x[:1])
        calls = sum(t.calls for t in td.values())
    print(
        f"ResNet-18, batch {args.batch}x3x{args.size}x{args.size}, CPU, no_grad, "
        f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds"
    )
    print(
        f"  {'variant':<24} {'median':>10}  {'ratio of medians':>16}  {'median of per-round ratios':>26}"
    )
    for name, values in times.items():
        med = statistics.median(values)
        paired = statistics.median(
            v / b for v, b in zip(values, times["bare forward"], strict=True)
        )
        print(f"  {name:<24} {med * 1000:7.1f} ms  {med / base:15.3f}x  {paired:25.3f}x")
    print(
        f"hook cost: {hook_us:.1f} us per traced call (a bare module call costs {call_us:.1f} us); "
        f"{calls} leaf calls per forward -> {calls * hook_us / 1000:.2f} ms = "
        f"{calls * hook_us / 1e6 / base:.4%} of the bare forward"
    )


if __name__ == "__main__":
    main()
