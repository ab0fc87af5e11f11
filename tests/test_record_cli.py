"""`nethook record` / `nethook info`, and kill -9 at a random moment: the rerun loses nothing."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nethook.cli import main
from nethook.runner import FunctionConsumer, StatConsumer, load_checkpoint, run
from nethook.stats.moments import Variance
from nethook.store import ActivationStore

SOURCE = "scenes:n=40,size=16,seed=1"
MODEL_FILE = textwrap.dedent(
    """
    import time
    import torch
    from torch import nn

    class Slow(nn.Module):
        # makes each batch take a while, so a kill lands in the middle of a recording
        def forward(self, x):
            time.sleep(0.04)
            return x

    def build(seed=3):
        g = torch.Generator().manual_seed(seed)
        model = nn.Sequential()
        model.add_module("slow", Slow())
        model.add_module("conv", nn.Conv2d(3, 8, 3, padding=1))
        model.add_module("relu", nn.ReLU())
        model.add_module("conv2", nn.Conv2d(8, 6, 3, stride=2))
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        return model

    def build_other():
        return build(seed=4)
    """
)


@pytest.fixture
def model_spec(tmp_path) -> str:
    path = tmp_path / "slow_model.py"
    path.write_text(MODEL_FILE)
    return f"{path}:build"


def record_args(model_spec: str, out: Path) -> list[str]:
    return [
        "record",
        "--model",
        model_spec,
        "--layers",
        "conv,conv2",
        "--source",
        SOURCE,
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--block-samples",
        "2",
        "--dtype",
        "float16",
        "--quiet",
    ]


def complete_blocks(out: Path) -> int:
    return len(list((out / "manifest").glob("c.*.0"))) if (out / "manifest").exists() else 0


def fork(target, *args) -> multiprocessing.Process:
    """Start ``target(*args)`` in a forked child (a real process, minus the import time)."""

    def child() -> None:
        torch.set_num_threads(1)  # OpenMP pools do not survive fork
        code = 1
        try:
            code = target(*args) or 0
        finally:
            os._exit(code)

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    return proc


def kill_when(proc: multiprocessing.Process, ready, timeout: float = 120) -> None:
    """SIGKILL ``proc`` as soon as ``ready()``; fail if it ends or stalls first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if not proc.is_alive():
            raise AssertionError(f"process ended (code {proc.exitcode}) before the kill")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the process never reached the kill point")
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_record_killed_with_sigkill_then_rerun_equals_uninterrupted(tmp_path, model_spec, capsys):
    out = tmp_path / "killed.zarr"
    args = record_args(model_spec, out) + ["--samples", "20"]
    proc = fork(main, args)
    kill_when(proc, lambda: complete_blocks(out) >= 3)
    partial = ActivationStore.open(out)
    done = len(partial.completed_blocks())
    assert 3 <= done < partial.n_blocks, "the kill must land mid-recording"
    assert main(["info", str(out)]) == 0
    assert f"{done}/10 blocks" in capsys.readouterr().out

    assert main(args) == 0  # rerun the same command: resumes
    reference = tmp_path / "whole.zarr"
    assert main(record_args(model_spec, reference) + ["--samples", "20"]) == 0
    capsys.readouterr()
    a, b = ActivationStore.open(out), ActivationStore.open(reference)
    assert a.is_complete() and a.verify() == []
    for layer in ("conv", "conv2"):
        np.testing.assert_array_equal(
            a.layer(layer).values.view(np.uint16), b.layer(layer).values.view(np.uint16)
        )
    assert tree_bytes(out) == tree_bytes(reference)


def test_record_matches_a_direct_forward_pass(tmp_path, model_spec, capsys):
    out = tmp_path / "s.zarr"
    assert main(record_args(model_spec, out)[:-1] + ["--samples", "6"]) == 0
    assert "6/6 samples" in capsys.readouterr().out
    from nethook.models import load_model
    from nethook.plugins import get_source

    source = get_source(SOURCE)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in source.normalization)
    x = (torch.stack([source[i]["image"] for i in range(6)]) - mean) / std
    model = load_model(model_spec)
    with torch.no_grad():
        want = model.conv(x)
    got = ActivationStore.open(out).layer("conv")
    assert got.dims == ("sample", "unit", "y", "x")
    assert got.attrs["source"] == SOURCE
    assert got.attrs["source_fingerprint"] == source.fingerprint()
    np.testing.assert_array_equal(got.values, want.half().numpy())


def test_record_refuses_another_model_or_layers(tmp_path, model_spec, capsys):
    out = tmp_path / "s.zarr"
    assert main(record_args(model_spec, out) + ["--samples", "4"]) == 0
    capsys.readouterr()
    other = model_spec.replace(":build", ":build_other")
    assert main(record_args(other, out) + ["--samples", "4"]) == 3
    err = capsys.readouterr().err
    assert "refusing to append" in err and f"model: store has '{model_spec}'" in err
    args = record_args(model_spec, out) + ["--samples", "4"]
    args[args.index("--layers") + 1] = "conv"
    assert main(args) == 3
    assert "layers: store has ['conv', 'conv2'], this run has ['conv']" in capsys.readouterr().err


def test_info_reports_a_corrupt_block_and_a_bad_path(tmp_path, model_spec, capsys):
    out = tmp_path / "s.zarr"
    assert main(record_args(model_spec, out) + ["--samples", "6"]) == 0
    chunk = out / "layers" / "conv2" / "activations" / "c.1.0.0.0"
    raw = bytearray(chunk.read_bytes())
    raw[3] ^= 0x55
    chunk.write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(["info", str(out), "--verify"]) == 1
    assert "'conv2' block 1 (samples 2..3)" in capsys.readouterr().out
    (tmp_path / "file.zarr").write_text("x")
    assert main(["info", str(tmp_path / "file.zarr")]) == 1
    assert "is a file" in capsys.readouterr().err


def tally(model_dir: Path, checkpoint: Path | None, slow: float = 0.0) -> dict:
    """Variance of conv2 over 60 random images in batches of 3, checkpointed every 2."""
    sys.path.insert(0, str(model_dir))
    try:
        from slow_model import build
    finally:
        sys.path.remove(str(model_dir))
    g = torch.Generator().manual_seed(0)
    source = torch.utils.data.TensorDataset(torch.rand(60, 3, 8, 8, generator=g))
    consumers = {
        "var": StatConsumer(Variance(), "conv2"),
        "slow": FunctionConsumer(lambda b: time.sleep(slow), "conv2"),
    }
    run(
        build(),
        source,
        consumers,
        batch_size=3,
        checkpoint=checkpoint,
        checkpoint_every=2,
        progress=False,
    )
    return consumers["var"].state_dict()


def test_killed_tally_resumes_from_its_checkpoint(tmp_path, model_spec):
    ckpt = tmp_path / "tally.ckpt.npz"
    proc = fork(tally, tmp_path, ckpt, 0.05)

    def checkpointed() -> bool:
        try:
            return load_checkpoint(ckpt)["batches_done"] >= 4
        except (FileNotFoundError, OSError, ValueError, KeyError):
            return False

    kill_when(proc, checkpointed)
    done = load_checkpoint(ckpt)["batches_done"]
    assert 4 <= done < 20
    got = tally(tmp_path, ckpt)  # rerun: resumes from the checkpoint
    want = tally(tmp_path, None)  # uninterrupted
    assert int(got["count"]) == 60 * 9  # no batch lost or counted twice
    for key in want:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)
