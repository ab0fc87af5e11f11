"""The activation store: layout, labels, resumability, integrity checks, bad input."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import nethook
import nethook.store as store_module
from nethook.store import (
    ActivationStore,
    CorruptBlockError,
    StoreError,
    StoreMismatchError,
    dims_for,
    from_storage,
    to_storage,
)

ATTRS = {
    "model": "tests:tiny",
    "model_hash": "abc123",
    "source": "ramp:n=10",
    "source_fingerprint": "fp1",
    "seed": 7,
}
SHAPES = {"conv": (4, 3, 2), "fc": (5,), "tok": (3, 6)}


def truth(n: int = 10) -> dict[str, np.ndarray]:
    """Activations whose every value encodes (sample, flat position) exactly in float32."""
    out = {}
    for k, (name, shape) in enumerate(SHAPES.items()):
        size = int(np.prod(shape))
        values = np.arange(n * size, dtype=np.float32).reshape(n, *shape) + 1000 * k
        out[name] = values
    return out


def write_all(store: ActivationStore, data: dict[str, np.ndarray], blocks=None) -> None:
    for b in range(store.n_blocks) if blocks is None else blocks:
        start, stop = store.block_range(b)
        store.write_block(b, {k: to_storage(v[start:stop], store.dtype) for k, v in data.items()})


def make(path, **kw) -> ActivationStore:
    options = {"layers": SHAPES, "samples": 10, "block_samples": 4, "attrs": ATTRS}
    options.update(kw)
    return ActivationStore.create(path, **options)


def test_dims_follow_layout():
    assert dims_for((8, 5, 5)) == ("sample", "unit", "y", "x")
    assert dims_for((7, 8)) == ("sample", "token", "unit")
    assert dims_for((8,)) == ("sample", "unit")
    with pytest.raises(ValueError, match="per-sample shape"):
        dims_for(())


def test_xarray_labels_values_and_attrs(tmp_path):
    ids = np.arange(100, 110)
    store = make(tmp_path / "s.zarr", sample_ids=ids)
    data = truth()
    write_all(store, data)
    store = ActivationStore.open(tmp_path / "s.zarr")
    conv = store.layer("conv")
    assert conv.dims == ("sample", "unit", "y", "x")
    assert conv.sample.values.tolist() == ids.tolist()
    assert conv.unit.values.tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(conv.values, data["conv"])
    assert store.layer("tok").dims == ("sample", "token", "unit")
    for key, value in ATTRS.items():
        assert conv.attrs[key] == value
    assert conv.attrs["layer"] == "conv"
    assert conv.attrs["dtype"] == "float32"
    assert conv.attrs["nethook_version"] == nethook.__version__
    ds = store.to_dataset()
    assert set(ds.data_vars) == {"conv", "fc", "tok"}
    # unit counts differ between layers, so each layer gets its own unit dim
    assert ds["fc"].dims == ("sample", "unit_fc")
    np.testing.assert_array_equal(ds["fc"].sel(sample=103).values, data["fc"][3])
    # the store is also a plain Zarr v3 hierarchy with named dims
    raw = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["layers/conv/activations"]
    assert list(raw.metadata.dimension_names) == ["sample", "unit", "y", "x"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_narrow_dtypes_round_trip_within_their_precision(tmp_path, dtype):
    x = torch.randn(10, 5) * 100
    store = ActivationStore.create(
        tmp_path / "s.zarr", layers={"fc": (5,)}, samples=10, dtype=dtype, block_samples=3
    )
    for b in range(store.n_blocks):
        s, e = store.block_range(b)
        store.write_block(b, {"fc": to_storage(x[s:e], dtype)})
    got = store.layer("fc").values
    assert got.dtype == (np.float16 if dtype == "float16" else np.float32)
    expected = x.to(getattr(torch, dtype)).float().numpy()  # torch's rounding is the truth
    np.testing.assert_array_equal(got.astype(np.float32), expected)
    bound = 2.0**-8 if dtype == "bfloat16" else 2.0**-11
    assert np.all(np.abs(got - x.numpy()) <= bound * np.abs(x.numpy()) + 1e-30)


def test_bfloat16_bits_decode():
    bits = np.array([0x3F80, 0xC000, 0x0000], np.uint16)  # 1.0, -2.0, 0.0
    np.testing.assert_array_equal(from_storage(bits, "bfloat16"), [1.0, -2.0, 0.0])


def test_reader_sees_only_complete_blocks(tmp_path):
    store = make(tmp_path / "s.zarr")
    data = truth()
    write_all(store, data, blocks=[0, 2])
    # a half-written block: chunks present, no manifest entry
    store._arrays["fc"][4:8] = data["fc"][4:8]
    reader = ActivationStore.open(tmp_path / "s.zarr")
    assert reader.completed_blocks().tolist() == [0, 2]
    fc = reader.layer("fc")
    assert fc.sample.values.tolist() == [0, 1, 2, 3, 8, 9]
    np.testing.assert_array_equal(fc.values, data["fc"][[0, 1, 2, 3, 8, 9]])
    with pytest.raises(StoreError, match="samples 4..7"):
        reader.read_block("fc", 1)
    assert reader.summary()["missing_ranges"] == [[4, 8]]


def test_sharded_layout_reads_back(tmp_path):
    store = make(tmp_path / "s.zarr", block_samples=4, chunk_samples=2)
    arr = store._arrays["conv"]
    assert arr.shards[0] == 4 and arr.chunks[0] == 2
    data = truth()
    write_all(store, data)
    np.testing.assert_array_equal(
        ActivationStore.open(tmp_path / "s.zarr").layer("conv").values, data["conv"]
    )


def test_compressed_store_reads_back(tmp_path):
    store = make(tmp_path / "s.zarr", compressor="zstd")
    data = truth()
    write_all(store, data)
    np.testing.assert_array_equal(store.layer("tok").values, data["tok"])


def test_resume_refuses_other_model_layer_or_source(tmp_path):
    path = tmp_path / "s.zarr"
    make(path)
    same = {"layers": SHAPES, "samples": 10, "block_samples": 4}
    ActivationStore.open_or_create(path, attrs=ATTRS, **same)  # same identity: fine
    with pytest.raises(StoreMismatchError, match="model: store has 'tests:tiny'"):
        ActivationStore.open_or_create(path, attrs={**ATTRS, "model": "other"}, **same)
    with pytest.raises(StoreMismatchError, match="model_hash"):
        ActivationStore.open_or_create(path, attrs={**ATTRS, "model_hash": "zzz"}, **same)
    with pytest.raises(StoreMismatchError, match="source_fingerprint"):
        ActivationStore.open_or_create(path, attrs={**ATTRS, "source_fingerprint": "x"}, **same)
    with pytest.raises(StoreMismatchError, match="layers"):
        ActivationStore.open_or_create(
            path, attrs=ATTRS, layers={"conv": (4, 3, 2)}, samples=10, block_samples=4
        )


def test_corrupted_chunk_is_reported_with_its_sample_range(tmp_path):
    store = make(tmp_path / "s.zarr")
    write_all(store, truth())
    chunk = tmp_path / "s.zarr" / "layers" / "fc" / "activations" / "c.1.0"
    raw = bytearray(chunk.read_bytes())
    raw[7] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    reader = ActivationStore.open(tmp_path / "s.zarr")
    problems = reader.verify()
    assert [(p.layer, p.block, p.start, p.stop) for p in problems] == [("fc", 1, 4, 8)]
    with pytest.raises(CorruptBlockError, match=r"'fc' block 1 \(samples 4..7\)"):
        reader.read_block("fc", 1)
    reader.read_block("fc", 0)  # neighbours are fine
    # invalidating the block makes the next recording rewrite it
    writer = ActivationStore.open(tmp_path / "s.zarr", "r+")
    writer.invalidate(1)
    assert writer.missing_blocks().tolist() == [1]


def test_undecodable_chunk_is_reported(tmp_path):
    store = make(tmp_path / "s.zarr", compressor="zstd")
    write_all(store, truth())
    chunk = tmp_path / "s.zarr" / "layers" / "tok" / "activations" / "c.2.0.0"
    chunk.write_bytes(b"garbage")
    with pytest.raises(CorruptBlockError, match=r"block 2 \(samples 8..9\)"):
        ActivationStore.open(tmp_path / "s.zarr").read_block("tok", 2)


def test_path_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "not-a-store.zarr"
    path.write_text("hello")
    with pytest.raises(StoreError, match="is a file"):
        make(path)
    with pytest.raises(StoreError, match="is a file"):
        ActivationStore.open(path)


def test_missing_store_and_foreign_group(tmp_path):
    with pytest.raises(StoreError, match="no activation store"):
        ActivationStore.open(tmp_path / "nothing.zarr")
    zarr.open_group(str(tmp_path / "g.zarr"), mode="w").create_array("a", shape=(1,), dtype="f4")
    with pytest.raises(StoreError, match="not a nethook"):
        ActivationStore.open(tmp_path / "g.zarr")
    with pytest.raises(StoreError, match="not a nethook"):
        make(tmp_path / "g.zarr")


@pytest.mark.parametrize("compressor", [None, "zstd"])  # direct chunk files / zarr's path
@pytest.mark.parametrize(
    ("code", "message"), [(errno.ENOSPC, "disk is full"), (errno.EACCES, "permission denied")]
)
def test_write_failure_is_clear_and_store_stays_resumable(
    tmp_path, monkeypatch, code, message, compressor
):
    path = tmp_path / "s.zarr"
    data = truth()
    store = make(path, compressor=compressor)
    write_all(store, data, blocks=[0])

    def failing(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    with monkeypatch.context() as patch:
        patch.setattr(type(store._arrays["fc"]), "__setitem__", failing)
        patch.setattr(store_module, "_write_file", failing)
        with pytest.raises(StoreError, match=message) as info:
            write_all(store, data, blocks=[1])
    assert "rerun the same command to resume" in str(info.value)
    resumed = ActivationStore.open_or_create(
        path, layers=SHAPES, samples=10, block_samples=4, attrs=ATTRS, compressor=compressor
    )
    assert resumed.completed_blocks().tolist() == [0]
    write_all(resumed, data, blocks=resumed.missing_blocks())
    for name in SHAPES:
        np.testing.assert_array_equal(resumed.layer(name).values, data[name])


def test_resumed_store_is_byte_identical_to_uninterrupted(tmp_path):
    data = truth()
    whole = make(tmp_path / "whole.zarr")
    write_all(whole, data)
    part = make(tmp_path / "part.zarr")
    write_all(part, data, blocks=[0])
    part._arrays["conv"][4:8] = data["conv"][4:8] + 1  # half-written garbage, not in manifest
    (tmp_path / "part.zarr" / "manifest" / "c.1.0.abc.partial").write_bytes(b"x")
    resumed = ActivationStore.open_or_create(
        tmp_path / "part.zarr", layers=SHAPES, samples=10, block_samples=4, attrs=ATTRS
    )
    write_all(resumed, data, blocks=resumed.missing_blocks())
    assert tree_bytes(tmp_path / "whole.zarr") == tree_bytes(tmp_path / "part.zarr")


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_fsspec_memory_path():
    path = "memory://nethook-tests/s.zarr"
    store = make(path)
    data = truth()
    write_all(store, data)
    reopened = ActivationStore.open(path)
    assert reopened.is_complete()
    np.testing.assert_array_equal(reopened.layer("fc").values, data["fc"])


def test_bad_arguments_name_the_input(tmp_path):
    with pytest.raises(ValueError, match="unknown storage dtype 'int8'"):
        make(tmp_path / "a.zarr", dtype="int8")
    with pytest.raises(ValueError, match="sample_ids has shape"):
        make(tmp_path / "b.zarr", sample_ids=[1, 2])
    store = make(tmp_path / "c.zarr")
    with pytest.raises(ValueError, match="expected float32"):
        store.write_block(0, {k: v[:4].astype(np.float64) for k, v in truth().items()})
    with pytest.raises(KeyError, match="holds conv, fc, tok"):
        store.layer("nope")


def test_direct_chunk_writes_are_the_bytes_zarr_writes(tmp_path):
    data = truth()
    fast = make(tmp_path / "fast.zarr")
    write_all(fast, data)
    for name in SHAPES:
        arr = fast._arrays[name]
        assert fast._direct_chunk_path(arr, 0) is not None  # the fast path was taken
        twin = zarr.create_array(
            str(tmp_path / f"zarr-{name}.zarr"),
            shape=arr.shape,
            chunks=arr.chunks,
            dtype=arr.dtype,
            fill_value=0,
            compressors=None,
            chunk_key_encoding=store_module.FLAT_KEYS,
        )
        twin[:] = data[name]
        for block in range(fast.n_blocks):
            key = arr.metadata.encode_chunk_key((block,) + (0,) * (arr.ndim - 1))
            mine = (tmp_path / "fast.zarr" / arr.path / key).read_bytes()
            theirs = (tmp_path / f"zarr-{name}.zarr" / key).read_bytes()
            assert mine == theirs, f"{name} block {block}"


def test_a_directory_of_other_files_is_never_overwritten(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a Zarr store"):
        make(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_streamed_blocks_equal_written_blocks(tmp_path):
    data = truth()
    written = make(tmp_path / "written.zarr")
    write_all(written, data)
    streamed = make(tmp_path / "streamed.zarr")
    assert streamed.can_stream()
    for block in (2, 0, 1):  # any order; the edge block 2 is padded
        start, stop = streamed.block_range(block)
        stream = streamed.stream_block(block)
        for cut in range(start, stop, 3):  # pieces of 3 samples, layers interleaved
            for name in SHAPES:
                stream.append(name, data[name][cut : min(cut + 3, stop)])
        stream.commit(background=True)
    streamed.flush()
    assert tree_bytes(tmp_path / "written.zarr") == tree_bytes(tmp_path / "streamed.zarr")
    stream = streamed.stream_block(0)
    with pytest.raises(ValueError, match="holds 4 samples"):
        stream.append("fc", data["fc"][:5])
    stream.append("fc", data["fc"][:4])
    with pytest.raises(ValueError, match="not full"):
        stream.commit()
    stream.abort()
    assert not list((tmp_path / "streamed.zarr").rglob("*.partial"))
    assert not make(tmp_path / "z.zarr", compressor="zstd").can_stream()
