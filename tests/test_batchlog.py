"""BatchLog: per-batch records written atomically, tied to a key, resumable."""

from __future__ import annotations

import numpy as np
import pytest

from nethook.batchlog import BatchLog


def test_records_round_trip_in_order(tmp_path) -> None:
    log = BatchLog(tmp_path / "log", "k1")
    rng = np.random.default_rng(0)
    written = [{"index": rng.integers(0, 99, n), "value": rng.random(n)} for n in (5, 0, 17)]
    for number, arrays in enumerate(written):
        log.write(number, arrays)
    assert log.done() == 3
    for got, want in zip(log.batches(), written, strict=True):
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
            assert got[name].dtype == want[name].dtype


def test_resume_point_is_the_first_missing_batch(tmp_path) -> None:
    log = BatchLog(tmp_path / "log", "k1")
    for number in (0, 1, 3):
        log.write(number, {"x": np.arange(number)})
    assert log.done() == 2
    assert [int(r["x"].size) for r in log.batches()] == [0, 1]
    with pytest.raises(FileNotFoundError, match="has no batch 2"):
        log.read(2)
    # a run split over two processes: each resumes at its own first missing batch
    assert log.done(0, 2) == 2
    assert log.done(1, 2) == 5


def test_another_key_starts_afresh(tmp_path) -> None:
    BatchLog(tmp_path / "log", "k1").write(0, {"x": np.ones(3)})
    assert BatchLog(tmp_path / "log", "k1").done() == 1
    assert BatchLog(tmp_path / "log", "k2").done() == 0


def test_a_failed_write_leaves_no_record(tmp_path) -> None:
    log = BatchLog(tmp_path / "log", "k1")
    with pytest.raises(ValueError, match="'x' holds Python objects"):
        log.write(0, {"x": np.array([object()])})  # would need pickle to load: refused
    assert log.done() == 0
    assert [p.name for p in (tmp_path / "log").iterdir()] == ["log.json"]
    log.remove()
    assert not (tmp_path / "log").exists()
