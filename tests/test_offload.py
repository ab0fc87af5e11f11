"""Consumers in a worker process: same results, errors raised, checkpoints, resume."""

from __future__ import annotations

import os

import numpy as np
import pytest

from nethook.offload import Forked, OffloadError, in_parallel
from nethook.runner import FunctionConsumer, StatConsumer, load_checkpoint, run
from nethook.stats.base import from_state_dict
from nethook.stats.moments import Variance
from tests.test_runner import Crash, Ramp, SampleLog, crash_at, tiny_model


def consumers() -> dict:
    return {
        "var": StatConsumer(Variance(), "conv"),
        "log": StatConsumer(SampleLog(), "fc", transform=lambda x: x[:, 0]),
    }


def assert_same_states(got: dict, want: dict) -> None:
    for name in want:
        a, b = got[name].state_dict(), want[name].state_dict()
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


def test_offloaded_consumers_end_in_the_same_state() -> None:
    here, there = consumers(), consumers()
    run(tiny_model(), Ramp(23), here, batch_size=4, progress=False)
    run(tiny_model(), Ramp(23), there, batch_size=4, progress=False, offload=True)
    assert_same_states(there, here)
    assert there["log"].stat.seen.tolist() == [2 * (3 * i + 3) for i in range(23)]


def run_offloaded(fn) -> None:
    """Run ``fn(batch)`` as the only consumer, in the worker process."""
    consumer = FunctionConsumer(fn, "conv")
    run(tiny_model(), Ramp(23), {"fn": consumer}, batch_size=4, progress=False, offload=True)


def test_a_consumer_error_is_raised_in_the_caller() -> None:
    def fail(batch) -> None:
        if batch.number == 2:
            raise ValueError("bad batch 2")

    with pytest.raises(ValueError, match="bad batch 2") as info:
        run_offloaded(fail)
    assert any("worker process" in note for note in info.value.__notes__)


def test_a_dead_worker_is_reported() -> None:
    def die(batch) -> None:
        if batch.number == 1:
            os._exit(3)

    with pytest.raises(OffloadError, match="died"):
        run_offloaded(die)


def test_killed_offloaded_tally_resumes_to_the_same_state(tmp_path) -> None:
    reference = consumers()
    run(tiny_model(), Ramp(23), reference, batch_size=3, progress=False)
    ckpt = tmp_path / "tally.npz"
    kwargs = dict(batch_size=3, checkpoint=ckpt, checkpoint_every=2, progress=False)
    with pytest.raises(Crash):
        run(tiny_model(), Ramp(23), {**consumers(), "crash": crash_at(5)}, offload=True, **kwargs)
    assert load_checkpoint(ckpt)["batches_done"] == 4  # saved after batches 2 and 4
    resumed = consumers()
    run(tiny_model(), Ramp(23), resumed, offload=True, **kwargs)
    assert_same_states(resumed, reference)


def test_forked_call_returns_its_result_or_raises() -> None:
    assert Forked(lambda: {"sum": np.arange(5).sum()}).result() == {"sum": 10}

    def fail() -> None:
        raise KeyError("missing thing")

    with pytest.raises(KeyError, match="missing thing"):
        Forked(fail).result()
    with pytest.raises(OffloadError, match="died"):
        Forked(lambda: os._exit(4)).result()


def test_in_parallel_returns_each_part_in_order() -> None:
    assert in_parallel(lambda part: (part, os.getpid()), 1) == [(0, os.getpid())]
    results = in_parallel(lambda part: (part, os.getpid()), 3)
    assert [part for part, _ in results] == [0, 1, 2]
    assert results[0][1] == os.getpid() and len({pid for _, pid in results}) == 3
    with pytest.raises(ValueError, match="parts"):
        in_parallel(lambda part: part, 0)


def test_in_parallel_raises_a_failed_part_and_restores_threads() -> None:
    import torch

    threads = torch.get_num_threads()

    def fail_in_child(part: int) -> int:
        if part == 1:
            raise KeyError("part 1 failed")
        return part

    with pytest.raises(KeyError, match="part 1 failed") as info:
        in_parallel(fail_in_child, 2)
    assert any("forked process" in note for note in info.value.__notes__)
    with pytest.raises(ValueError, match="part 0 failed"):
        in_parallel(lambda part: (_ for _ in ()).throw(ValueError(f"part {part} failed")), 2)
    assert torch.get_num_threads() == threads


def test_shards_in_parallel_merge_to_the_whole_run(tmp_path) -> None:
    """Each process runs every other batch (checkpointing its own share); merged
    states equal one run over everything, also after a crash and a resume."""
    reference = consumers()
    run(tiny_model(), Ramp(23), reference, batch_size=3, progress=False)

    def part(index: int, crash: bool = False) -> dict:
        mine = {**consumers(), **({"crash": crash_at(6)} if crash else {})}
        run(
            tiny_model(),
            Ramp(23),
            mine,
            batch_size=3,
            checkpoint=tmp_path / f"part{index}.npz",
            checkpoint_every=2,
            progress=False,
            shard=(index, 2),
        )
        return {name: c.stat.state_dict() for name, c in mine.items() if name != "crash"}

    with pytest.raises(Crash):
        in_parallel(lambda index: part(index, crash=True), 2)
    # shard 0 (batches 0, 2, 4, 6) saved after batches 2 and 4 (the count passed 2, 4); 6 lost
    assert load_checkpoint(tmp_path / "part0.npz")["batches_done"] == 5
    states = in_parallel(part, 2)
    merged = consumers()
    merged["var"].stat.load_state_dict(states[0]["var"])
    merged["var"].stat.merge(from_state_dict(states[1]["var"]))
    seen = np.concatenate([s["log"]["seen"] for s in states])
    assert sorted(seen.tolist()) == sorted(reference["log"].stat.seen.tolist())
    np.testing.assert_allclose(
        merged["var"].stat.variance(), reference["var"].stat.variance(), rtol=1e-6
    )
