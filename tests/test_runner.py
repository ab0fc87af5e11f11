"""The batch runner: consumers, deterministic order, checkpoint/resume, second pass from a store."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nethook.runner import (
    Batch,
    FunctionConsumer,
    StatConsumer,
    StoreWriter,
    load_checkpoint,
    run,
    run_store,
    save_checkpoint,
)
from nethook.stats.base import Stat, flatten
from nethook.stats.moments import Mean, Variance
from nethook.store import ActivationStore, StoreError, StoreMismatchError


class Ramp(torch.utils.data.Dataset):
    """Image i is constant i + channel (exact in float32); label map marks its left half with concept i % 3 + 1."""

    def __init__(self, n: int = 23):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        image = torch.stack([torch.full((4, 4), float(i + c)) for c in range(3)])
        labels = torch.zeros(4, 4, dtype=torch.int64)
        labels[:, :2] = i % 3 + 1
        return {"image": image, "labels": labels, "index": i}


def tiny_model() -> nn.Module:
    """conv: unit u outputs (u + 1) * (sum of input channels); fc: mean-pooled conv, scaled by 2."""
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(3, 4, 1, bias=False))
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        model.conv.weight.copy_(torch.arange(1.0, 5.0).view(4, 1, 1, 1).expand(4, 3, 1, 1))
        model.fc.weight.copy_(2 * torch.eye(4))
    return model.eval()


def true_conv(n: int) -> np.ndarray:
    """Ground truth of the conv layer for samples 0..n-1: [n, 4, 4, 4]."""
    i = np.arange(n, dtype=np.float64)[:, None]
    channel_sum = 3 * i + 3
    per_unit = channel_sum * np.arange(1, 5)[None, :]
    return np.broadcast_to(per_unit[:, :, None, None], (n, 4, 4, 4)).astype(np.float32)


class SampleLog(Stat):
    """Test stat that remembers every sample it saw (to catch lost or doubled batches)."""

    def __init__(self):
        self.seen = np.zeros(0, np.int64)

    def update(self, x):
        self.seen = np.concatenate([self.seen, np.asarray(x)])

    def state_dict(self):
        return {**self._header(), "seen": self.seen.copy()}

    def load_state_dict(self, sd):
        self.seen = np.asarray(sd["seen"])


class Crash(Exception):
    pass


def crash_at(number: int) -> FunctionConsumer:
    def fn(batch: Batch) -> None:
        if batch.number == number:
            raise Crash(f"killed at batch {number}")

    return FunctionConsumer(fn, "conv")


def test_stat_consumers_match_ground_truth():
    source = Ramp(23)
    consumers = {
        "mean": StatConsumer(Mean(), "conv"),
        "var": StatConsumer(Variance(), "fc"),
    }
    run(tiny_model(), source, consumers, batch_size=5, progress=False)
    conv = true_conv(23)
    flat = conv.transpose(0, 2, 3, 1).reshape(-1, 4).astype(np.float64)
    np.testing.assert_allclose(consumers["mean"].stat.mean().numpy(), flat.mean(0), rtol=1e-6)
    fc = 2 * conv[:, :, 0, 0].astype(np.float64)
    np.testing.assert_allclose(
        consumers["var"].stat.variance().numpy(), fc.var(0, ddof=1), rtol=1e-5
    )
    assert consumers["mean"].stat.count == 23 * 16


def test_function_consumer_sees_activations_labels_and_positions():
    seen = []

    def iou_like(batch: Batch) -> None:
        acts = batch.acts["conv"]
        assert acts.shape[1:] == (4, 4, 4)  # [B, U, H, W], unflattened
        labels = batch.data["labels"]
        seen.append(
            (batch.positions.tolist(), batch.data["index"].tolist(), labels[:, 0, 0].tolist())
        )
        np.testing.assert_array_equal(acts.numpy(), true_conv(23)[batch.positions.numpy()])

    run(
        tiny_model(),
        Ramp(23),
        FunctionConsumer(iou_like, "conv"),
        batch_size=8,
        start=3,
        samples=15,
        progress=False,
    )
    positions = [p for batch in seen for p in batch[0]]
    assert positions == list(range(3, 18))
    assert [i for batch in seen for i in batch[1]] == positions
    assert [c for batch in seen for c in batch[2]] == [p % 3 + 1 for p in positions]


def test_workers_keep_source_order():
    log = SampleLog()
    consumer = StatConsumer(log, "fc", transform=lambda x: (x[:, 0] / 6 - 1).round().long())
    run(tiny_model(), Ramp(23), consumer, batch_size=4, num_workers=2, progress=False)
    # fc unit 0 = 2 * (3i + 3), so the transform recovers i
    assert log.seen.tolist() == list(range(23))


def test_stop_forward_skips_later_layers():
    model = tiny_model()
    calls = []
    model.fc.register_forward_hook(lambda *a: calls.append(1))
    run(model, Ramp(6), StatConsumer(Mean(), "conv"), batch_size=3, progress=False)
    assert calls == []


def test_killed_tally_resumes_to_the_same_state(tmp_path):
    source = Ramp(23)
    reference = {
        "var": StatConsumer(Variance(), "conv"),
        "log": StatConsumer(SampleLog(), "fc", transform=lambda x: x[:, 0]),
    }
    run(tiny_model(), source, reference, batch_size=3, progress=False)

    ckpt = tmp_path / "tally.npz"

    def consumers():
        return {
            "var": StatConsumer(Variance(), "conv"),
            "log": StatConsumer(SampleLog(), "fc", transform=lambda x: x[:, 0]),
        }

    first = consumers()
    with pytest.raises(Crash):
        run(
            tiny_model(),
            source,
            {**first, "crash": crash_at(5)},
            batch_size=3,
            checkpoint=ckpt,
            checkpoint_every=2,
            progress=False,
        )
    assert load_checkpoint(ckpt)["batches_done"] == 4  # saved after batches 2 and 4; 5 lost
    second = consumers()
    run(
        tiny_model(),
        source,
        second,
        batch_size=3,
        checkpoint=ckpt,
        checkpoint_every=2,
        progress=False,
    )
    for name in ("var", "log"):
        want, got = reference[name].state_dict(), second[name].state_dict()
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_array_equal(
                np.asarray(got[key]), np.asarray(want[key]), err_msg=f"{name}.{key}"
            )


def test_checkpoint_of_another_run_is_refused(tmp_path):
    ckpt = tmp_path / "t.npz"
    run(
        tiny_model(),
        Ramp(8),
        {"m": StatConsumer(Mean(), "conv")},
        batch_size=4,
        checkpoint=ckpt,
        progress=False,
    )
    with pytest.raises(ValueError, match="batch_size: checkpoint has 4, this run has 2"):
        run(
            tiny_model(),
            Ramp(8),
            {"m": StatConsumer(Mean(), "conv")},
            batch_size=2,
            checkpoint=ckpt,
            progress=False,
        )


def test_checkpoint_round_trip(tmp_path):
    state = {
        "a": np.arange(3),
        "b": {"c": "text", "d": 2.5, "e": None, "f": np.float32(1.5)},
        "g": {},
    }
    save_checkpoint(tmp_path / "c.npz", state)
    back = load_checkpoint(tmp_path / "c.npz")
    np.testing.assert_array_equal(back["a"], np.arange(3))
    assert back["b"] == {"c": "text", "d": 2.5, "e": None, "f": 1.5}
    assert back["g"] == {}
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]


def record(
    path,
    source,
    *,
    crash=None,
    dtype="float32",
    batch_size=5,
    block_samples=4,
    model=None,
    attrs=None,
):
    writer = StoreWriter(
        path,
        ["conv", "fc"],
        samples=len(source),
        dtype=dtype,
        block_samples=block_samples,
        attrs=attrs or {"model": "tiny", "source": "ramp"},
    )
    consumers = {"store": writer}
    if crash is not None:
        consumers["crash"] = crash_at(crash)
    run(model or tiny_model(), source, consumers, batch_size=batch_size, progress=False)
    return writer


def test_store_writer_records_the_true_activations(tmp_path):
    record(tmp_path / "s.zarr", Ramp(23))
    store = ActivationStore.open(tmp_path / "s.zarr")
    assert store.is_complete()
    np.testing.assert_array_equal(store.layer("conv").values, true_conv(23))
    np.testing.assert_array_equal(store.layer("fc").values, 2 * true_conv(23)[:, :, 0, 0])
    assert store.layer("fc").attrs["model"] == "tiny"


def test_store_writer_resumes_after_a_crash(tmp_path):
    source = Ramp(23)
    with pytest.raises(Crash):
        record(tmp_path / "s.zarr", source, crash=3)
    partial = ActivationStore.open(tmp_path / "s.zarr")
    # the store got batches 0-3 (samples 0..19) before the crash: blocks 0-4 are complete
    assert partial.completed_blocks().tolist() == [0, 1, 2, 3, 4]
    writer = StoreWriter(
        tmp_path / "s.zarr",
        ["conv", "fc"],
        samples=23,
        block_samples=4,
        attrs={"model": "tiny", "source": "ramp"},
    )
    assert writer.resume_batch(5) == 4  # sample 20, the first missing one, is in batch 4
    record(tmp_path / "s.zarr", source)
    record(tmp_path / "whole.zarr", source)
    a, b = ActivationStore.open(tmp_path / "s.zarr"), ActivationStore.open(tmp_path / "whole.zarr")
    for layer in ("conv", "fc"):
        np.testing.assert_array_equal(a.layer(layer).values, b.layer(layer).values)


def test_store_writer_refuses_another_model_before_running(tmp_path):
    record(tmp_path / "s.zarr", Ramp(8))
    with pytest.raises(StoreMismatchError, match="model: store has 'tiny', this run has 'other'"):
        StoreWriter(
            tmp_path / "s.zarr",
            ["conv", "fc"],
            samples=8,
            block_samples=4,
            attrs={"model": "other", "source": "ramp"},
        )
    with pytest.raises(StoreMismatchError, match="layers"):
        StoreWriter(
            tmp_path / "s.zarr",
            ["conv"],
            samples=8,
            block_samples=4,
            attrs={"model": "tiny", "source": "ramp"},
        )


def test_second_pass_from_store_equals_the_forward_pass(tmp_path):
    source = Ramp(23)
    record(tmp_path / "s.zarr", source, block_samples=6)
    live = {"var": StatConsumer(Variance(), "conv"), "mean": StatConsumer(Mean(), "fc")}
    run(tiny_model(), source, live, batch_size=5, progress=False)
    stored = {"var": StatConsumer(Variance(), "conv"), "mean": StatConsumer(Mean(), "fc")}
    labels_seen = []
    stored["labels"] = FunctionConsumer(
        lambda b: labels_seen.extend(b.data["index"].tolist()), "conv"
    )
    run_store(tmp_path / "s.zarr", stored, batch_size=5, source=source, progress=False)
    for name in ("var", "mean"):
        want, got = live[name].state_dict(), stored[name].state_dict()
        for key in want:
            np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))
    assert labels_seen == list(range(23))


def test_second_pass_checkpoint_resumes(tmp_path):
    source = Ramp(23)
    record(tmp_path / "s.zarr", source)
    ckpt = tmp_path / "pass.npz"
    log = StatConsumer(SampleLog(), "fc", transform=lambda x: x[:, 0])
    with pytest.raises(Crash):
        run_store(
            tmp_path / "s.zarr",
            {"log": log, "crash": crash_at(3)},
            batch_size=3,
            checkpoint=ckpt,
            checkpoint_every=1,
            progress=False,
        )
    resumed = StatConsumer(SampleLog(), "fc", transform=lambda x: x[:, 0])
    run_store(
        tmp_path / "s.zarr",
        {"log": resumed},
        batch_size=3,
        checkpoint=ckpt,
        checkpoint_every=1,
        progress=False,
    )
    np.testing.assert_array_equal(resumed.stat.seen, 2 * true_conv(23)[:, 0, 0, 0])


def test_second_pass_needs_a_complete_store(tmp_path):
    with pytest.raises(Crash):
        record(tmp_path / "s.zarr", Ramp(23), crash=2)
    with pytest.raises(Exception, match="incomplete"):
        run_store(tmp_path / "s.zarr", StatConsumer(Mean(), "conv"), progress=False)


def test_bad_consumers_and_ranges_are_named():
    with pytest.raises(TypeError, match="consumer 'x'"):
        run(tiny_model(), Ramp(4), {"x": lambda b: None}, progress=False)
    with pytest.raises(ValueError, match="source, which has 4 samples"):
        run(tiny_model(), Ramp(4), StatConsumer(Mean(), "conv"), samples=9, progress=False)


def test_flatten_is_the_default_transform():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    log = SampleLog()
    StatConsumer(log, "l", transform=lambda t: flatten(t)[:, 1])(
        Batch({"l": x}, None, torch.arange(2), 0, 0)
    )
    np.testing.assert_array_equal(log.seen, x[:, 1].reshape(-1).numpy())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_store_writer_casts_like_torch(tmp_path, dtype):
    model = tiny_model()
    with torch.no_grad():
        model.conv.weight.div_(3)  # values no narrow float holds exactly
    record(tmp_path / "s.zarr", Ramp(23), dtype=dtype, model=model)
    got = ActivationStore.open(tmp_path / "s.zarr").layer("conv").values
    with torch.no_grad():
        exact = model.conv(torch.stack([Ramp(23)[i]["image"] for i in range(23)]))
    want = exact.to(getattr(torch, dtype)).float().numpy()
    np.testing.assert_array_equal(got.astype(np.float32), want)
    assert not np.array_equal(want, exact.numpy())  # the cast did round


def test_store_and_tally_resume_together(tmp_path):
    """Each consumer resumes from its own point; none misses or repeats a sample."""
    source = Ramp(23)

    def consumers(crash=None):
        out = {
            "store": StoreWriter(
                tmp_path / "s.zarr",
                ["conv", "fc"],
                samples=23,
                block_samples=4,
                attrs={"model": "tiny"},
            ),
            "log": StatConsumer(SampleLog(), "fc", transform=lambda x: x[:, 0]),
        }
        if crash is not None:
            out["crash"] = crash_at(crash)
        return out

    ckpt = tmp_path / "t.npz"
    with pytest.raises(Crash):
        run(
            tiny_model(),
            source,
            consumers(crash=5),
            batch_size=3,
            checkpoint=ckpt,
            checkpoint_every=2,
            progress=False,
        )
    assert load_checkpoint(ckpt)["batches_done"] == 4
    assert ActivationStore.open(tmp_path / "s.zarr").completed_blocks().tolist() == [0, 1, 2, 3]
    final = consumers()
    run(
        tiny_model(),
        source,
        final,
        batch_size=3,
        checkpoint=ckpt,
        checkpoint_every=2,
        progress=False,
    )
    np.testing.assert_array_equal(final["log"].stat.seen, 2 * true_conv(23)[:, 0, 0, 0])
    store = ActivationStore.open(tmp_path / "s.zarr")
    np.testing.assert_array_equal(store.layer("conv").values, true_conv(23))


def test_store_killed_during_creation_is_finished_by_the_rerun(tmp_path):
    import shutil

    source = Ramp(10)
    path = tmp_path / "s.zarr"
    with pytest.raises(Crash):
        record(path, source, crash=0)  # the store is created at the first batch
    # as if killed after the root metadata: arrays, coordinates and manifest never made it
    for part in ("manifest", "sample", "layers/conv", "layers/fc/activations"):
        shutil.rmtree(path / part)
    with pytest.raises(StoreError, match="killed while being created"):
        ActivationStore.open(path)
    record(path, source)
    store = ActivationStore.open(path)
    assert store.is_complete()
    np.testing.assert_array_equal(store.layer("conv").values, true_conv(10))
    assert store.layer("conv").sample.values.tolist() == list(range(10))


def record_labels(path, source, *, crash=None, block_samples=4):
    """Record conv with each sample's label map (uint8) and index (int64) as sample data."""
    writer = StoreWriter(
        path,
        ["conv"],
        samples=len(source),
        block_samples=block_samples,
        attrs={"model": "tiny", "source": "ramp"},
        sample_data=lambda b: {
            "labels": b.data["labels"].to(torch.uint8),
            "index": b.data["index"],
        },
    )
    consumers = {"store": writer}
    if crash is not None:
        consumers["crash"] = crash_at(crash)
    run(tiny_model(), source, consumers, batch_size=5, progress=False)


@pytest.mark.parametrize("block_samples", [4, 5])  # blocks across batches, and aligned
def test_sample_data_replays_the_labels_without_the_source(tmp_path, block_samples):
    source = Ramp(23)
    with pytest.raises(Crash):
        record_labels(tmp_path / "s.zarr", source, crash=2, block_samples=block_samples)
    record_labels(tmp_path / "s.zarr", source, block_samples=block_samples)
    store = ActivationStore.open(tmp_path / "s.zarr")
    assert store.sample_data == {
        "labels": ((4, 4), np.dtype("uint8")),
        "index": ((), np.dtype("int64")),
    }
    assert store.verify() == []
    seen = {"labels": [], "index": [], "conv": []}

    def log(batch: Batch) -> None:
        seen["labels"].append(batch.data["labels"].numpy())
        seen["index"].append(batch.data["index"].numpy())
        seen["conv"].append(batch.acts["conv"].numpy())

    run_store(store, FunctionConsumer(log, "conv"), batch_size=5, progress=False)
    labels = np.concatenate(seen["labels"])
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(
        labels, np.stack([source[i]["labels"].numpy() for i in range(23)])
    )
    np.testing.assert_array_equal(np.concatenate(seen["index"]), np.arange(23))
    np.testing.assert_array_equal(np.concatenate(seen["conv"]), true_conv(23))


def test_sample_data_is_checksummed_and_part_of_the_identity(tmp_path):
    from nethook.store import CorruptBlockError

    record_labels(tmp_path / "s.zarr", Ramp(8))
    store = ActivationStore.open(tmp_path / "s.zarr")
    chunk = tmp_path / "s.zarr" / "sample_data" / "labels" / "c.1.0.0"
    raw = bytearray(chunk.read_bytes())
    raw[3] ^= 1
    chunk.write_bytes(bytes(raw))
    with pytest.raises(CorruptBlockError, match="'labels' block 1"):
        store.read_block("labels", 1)
    with pytest.raises(Crash):
        record_labels(tmp_path / "t.zarr", Ramp(12), crash=1)
    with pytest.raises(StoreMismatchError, match="sample data"):  # resumed without labels
        run(
            tiny_model(),
            Ramp(12),
            StoreWriter(
                tmp_path / "t.zarr",
                ["conv"],
                samples=12,
                block_samples=4,
                attrs={"model": "tiny", "source": "ramp"},
            ),
            batch_size=5,
            progress=False,
        )


def test_outputs_an_in_place_op_changes_are_copied():
    """Traced outputs are kept without copies unless an in-place op downstream changes
    them: then the batch runs again with copies (and so does the rest of the run)."""
    conv = nn.Conv2d(3, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 0, 0], [-1.0, 0, 0]]).view(2, 3, 1, 1))
        conv.bias.zero_()
    model = nn.Sequential(conv, nn.ReLU(inplace=True), nn.Conv2d(2, 2, 1)).eval()
    seen = []
    consumer = FunctionConsumer(lambda batch: seen.append(batch.acts["0"].clone()), ["0", "2"])
    run(model, Ramp(6), consumer, batch_size=3, progress=False)
    images = torch.stack([Ramp(6)[i]["image"] for i in range(6)])
    with torch.no_grad():
        np.testing.assert_array_equal(torch.cat(seen).numpy(), conv(images).numpy())
    assert (torch.cat(seen) < 0).any()  # unit 1 is negative: the in-place ReLU was undone
