"""Consumers in a worker process: same results, errors raised, checkpoints, resume."""

from __future__ import annotations

import os

import numpy as np
import pytest

from nethook.offload import Forked, OffloadError
from nethook.runner import FunctionConsumer, StatConsumer, load_checkpoint, run
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
