"""Round trips against the reference `safetensors` library, the streaming writer's layout and errors."""
from __future__ import annotations

import gc
import json
import random
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adaptkit.errors import OutputError
from adaptkit.io import SafetensorsFile, ShardedWriter, TensorSpec, open_checkpoint, plan_shards


def _sample_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(17, 8, generator=g).to(torch.bfloat16),
        "layers.0.w": torch.randn(8, 8, generator=g),
        "layers.0.b": torch.randn(3, generator=g).to(torch.float16),  # odd-sized: 6 bytes
        "layers.0.d": torch.randn(2, 5, generator=g).double(),
        "ids": torch.randint(-(2**40), 2**40, (5,), generator=g),
        "i32": torch.randint(-1000, 1000, (3,), generator=g, dtype=torch.int32),
        "i16": torch.randint(-1000, 1000, (3,), generator=g, dtype=torch.int16),
        "i8": torch.randint(-100, 100, (5,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (7,), generator=g, dtype=torch.uint8),
        "mask": torch.rand(5, generator=g) > 0.5,
        "scalar": torch.tensor(2.5),
        "f8": torch.randn(9, generator=g).to(torch.float8_e4m3fn),
        "f8b": torch.randn(4, generator=g).to(torch.float8_e5m2),
        "ünï.wéight": torch.randn(2, generator=g),
    }


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8) if a.element_size() == 1
                                                                       else a, b.view(torch.uint8)
                                                                       if b.element_size() == 1 else b)


def _write(tmp, tensors, **kw):
    w = ShardedWriter(tmp, [TensorSpec.of(k, v) for k, v in tensors.items()], **kw)
    for k, v in tensors.items():
        w.write(k, v)
    return w.close()


def test_ours_to_safetensors_single_file(tmp_path):
    ts = _sample_tensors()
    files = _write(tmp_path, ts)
    assert [f.name for f in files] == ["model.safetensors"]
    ref = load_file(tmp_path / "model.safetensors")
    assert set(ref) == set(ts)
    for k in ts:
        assert _same(ref[k], ts[k]), k
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    # header padded with spaces to an 8-byte boundary, and every tensor aligned to its item size
    raw = (tmp_path / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0 and raw[8 + n - 1 : 8 + n] in (b"}", b" ")
    header = json.loads(raw[8 : 8 + n])
    for k, e in header.items():
        if k != "__metadata__":
            assert (8 + n + e["data_offsets"][0]) % ts[k].element_size() == 0, k


def test_safetensors_to_ours(tmp_path):
    ts = _sample_tensors(1)
    save_file(ts, tmp_path / "ref.safetensors", metadata={"note": "hi"})
    with SafetensorsFile(tmp_path / "ref.safetensors") as f:
        assert f.metadata == {"note": "hi"}
        assert set(f.infos) == set(ts)
        for k, v in ts.items():
            info = f.infos[k]
            assert info.shape == tuple(v.shape) and info.nbytes == v.numel() * v.element_size()
            assert _same(f.get(k), v), k
            assert _same(f.get(k, copy=True), v), k


def test_unaligned_tensor_is_copied_correctly(craft):
    # an F32 tensor at data offset 2 (after a 2-byte U8 tensor): legal, but cannot be a zero-copy view
    vals = torch.tensor([1.5, -2.25, 3.0])
    h = {"u": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
         "f": {"dtype": "F32", "shape": [3], "data_offsets": [2, 14]}}
    raw = json.dumps(h).encode()
    raw += b" " * (-len(raw) % 8)
    p = craft("unaligned.safetensors", raw, b"\x01\x02" + vals.numpy().tobytes())
    assert torch.equal(load_file(p)["f"], vals)  # the reference agrees the file is valid
    assert torch.equal(SafetensorsFile(p).get("f"), vals)


def test_get_is_zero_copy_view(tmp_path):
    ts = {"w": torch.randn(64, 64)}
    save_file(ts, tmp_path / "m.safetensors")
    f = SafetensorsFile(tmp_path / "m.safetensors")
    a, b = f.get("w"), f.get("w")
    assert a.data_ptr() == b.data_ptr()  # both views of the same mapping, no copy
    c = f.get("w", copy=True)
    assert c.data_ptr() != a.data_ptr() and torch.equal(c, ts["w"])


def _mapped(path) -> bool:
    with open("/proc/self/maps") as m:
        return str(path) in m.read()


def test_tensor_outlives_close_and_mapping_is_released(tmp_path):
    p = tmp_path / "live.safetensors"
    ref = torch.randn(1000)
    save_file({"w": ref}, p)
    f = SafetensorsFile(p)
    t = f.get("w")
    f.close()
    gc.collect()
    assert torch.equal(t, ref)  # still valid: the mapping lives while a tensor uses it
    del t
    gc.collect()
    assert not _mapped(p)  # and is unmapped once the last tensor is gone


def test_multi_shard_round_trip(tmp_path):
    ts = _sample_tensors(2)
    files = _write(tmp_path, ts, max_shard_size=200, metadata={"producer": "test"})
    shards = [f for f in files if f.suffix == ".safetensors"]
    n = len(shards)
    assert n > 2
    assert [f.name for f in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in ts.values())
    assert set(index["weight_map"]) == set(ts)
    seen = {}
    for shard in shards:
        with safe_open(shard, "pt") as f:
            assert f.metadata() == {"format": "pt", "producer": "test"}
        part = load_file(shard)
        for k, v in part.items():
            assert index["weight_map"][k] == shard.name
            assert k not in seen
            seen[k] = v
    assert set(seen) == set(ts)
    for k in ts:
        assert _same(seen[k], ts[k]), k
    # and read back through our checkpoint reader
    with open_checkpoint(tmp_path) as ck:
        assert set(ck.names()) == set(ts)
        assert ck.total_bytes == index["metadata"]["total_size"]
        assert ck.files == shards
        for k in ts:
            assert _same(ck.get(k), ts[k]), k


def test_plan_shards_spec_order_and_big_tensor_alone():
    specs = [TensorSpec("a", "F32", (10,)), TensorSpec("big", "F32", (100,)), TensorSpec("b", "F32", (10,)),
             TensorSpec("c", "F32", (10,)), TensorSpec("d", "U8", (1,))]
    plan = plan_shards(specs, max_shard_size=100)
    assert [[s.name for s in shard] for shard in plan] == [["a"], ["big"], ["b", "c", "d"]]
    assert sum(s.nbytes for s in plan[2]) <= 100


def test_big_tensor_gets_own_shard_on_disk(tmp_path):
    ts = {"a": torch.ones(4), "big": torch.arange(64.0), "b": torch.zeros(4)}
    _write(tmp_path, ts, max_shard_size=32)
    wm = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert wm["big"] not in (wm["a"], wm["b"])
    assert torch.equal(load_file(tmp_path / wm["big"])["big"], ts["big"])


def test_thread_parallel_writes_any_order(tmp_path):
    g = torch.Generator().manual_seed(3)
    ts = {f"t{i:03d}": torch.randn(int(torch.randint(1, 300, (1,), generator=g)), generator=g)
          .to(torch.bfloat16 if i % 3 == 0 else torch.float32) for i in range(120)}
    w = ShardedWriter(tmp_path, [TensorSpec.of(k, v) for k, v in ts.items()], max_shard_size=4000)
    order = list(ts)
    random.Random(0).shuffle(order)
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda k: w.write(k, ts[k]), order))
    w.close()
    got = {}
    for shard in sorted(tmp_path.glob("*.safetensors")):
        got.update(load_file(shard))
    assert set(got) == set(ts)
    for k in ts:
        assert torch.equal(got[k], ts[k]), k


def test_writer_accepts_noncontiguous_and_grad_tensors(tmp_path):
    base = torch.randn(6, 4, requires_grad=True)
    ts = {"t": base.t(), "s": base[::2, 1].detach()}
    w = ShardedWriter(tmp_path, [TensorSpec("t", "F32", (4, 6)), TensorSpec("s", "F32", (3,))])
    w.write("t", ts["t"])
    w.write("s", ts["s"])
    w.close()
    ref = load_file(tmp_path / "model.safetensors")
    assert torch.equal(ref["t"], ts["t"].detach()) and torch.equal(ref["s"], ts["s"])


def test_write_bytes(tmp_path):
    w = ShardedWriter(tmp_path, [TensorSpec("x", "I32", (2,))])
    with pytest.raises(ValueError, match="needs 8"):
        w.write_bytes("x", b"\0" * 7)
    w.write_bytes("x", struct.pack("<ii", 7, -3))  # a failed write can be retried
    w.close()
    assert load_file(tmp_path / "model.safetensors")["x"].tolist() == [7, -3]


def test_writer_rejects_mismatches(tmp_path):
    w = ShardedWriter(tmp_path, [TensorSpec("x", "BF16", (2, 3))])
    with pytest.raises(ValueError, match="dtype F32 does not match the planned BF16"):
        w.write("x", torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"shape \[3, 2\] does not match the planned \[2, 3\]"):
        w.write("x", torch.zeros(3, 2, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="not in the writer's specs"):
        w.write("y", torch.zeros(2, 3, dtype=torch.bfloat16))
    w.write("x", torch.zeros(2, 3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="already written"):
        w.write("x", torch.zeros(2, 3, dtype=torch.bfloat16))
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.write("x", torch.zeros(2, 3, dtype=torch.bfloat16))


def test_writer_rejects_bad_specs(tmp_path):
    with pytest.raises(ValueError, match="specified twice"):
        ShardedWriter(tmp_path, [TensorSpec("x", "F32", (1,)), TensorSpec("x", "F32", (1,))])
    with pytest.raises(ValueError, match="unknown dtype"):
        ShardedWriter(tmp_path, [TensorSpec("x", "F33", (1,))])
    with pytest.raises(ValueError, match="non-negative"):
        ShardedWriter(tmp_path, [TensorSpec("x", "F32", (-1,))])
    assert list(tmp_path.iterdir()) == []


def test_close_with_missing_tensors_fails_and_cleans_up(tmp_path):
    specs = [TensorSpec(f"t{i}", "F32", (8,)) for i in range(4)]
    w = ShardedWriter(tmp_path, specs, max_shard_size=64)
    w.write("t0", torch.zeros(8))
    w.write("t2", torch.zeros(8))
    with pytest.raises(OutputError, match="2 planned tensors were never written.*'t1', 't3'"):
        w.close()
    assert list(tmp_path.iterdir()) == []


def test_context_manager_aborts_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardedWriter(tmp_path, [TensorSpec("x", "F32", (1,))]) as w:
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    assert w.pending() == ["x"]


def test_shard_files_are_presized_with_header_first(tmp_path):
    specs = [TensorSpec("a", "F32", (100,)), TensorSpec("b", "BF16", (10,))]
    w = ShardedWriter(tmp_path, specs)
    raw = (tmp_path / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert len(raw) == 8 + n + 420 and header["__metadata__"] == {"format": "pt"}
    assert header["a"]["data_offsets"] == [0, 400] and header["b"]["data_offsets"] == [400, 420]
    w.write("b", torch.ones(10, dtype=torch.bfloat16))
    w.write("a", torch.ones(100))
    w.close()


def test_empty_spec_list_writes_valid_file(tmp_path):
    ShardedWriter(tmp_path, []).close()
    assert load_file(tmp_path / "model.safetensors") == {}
