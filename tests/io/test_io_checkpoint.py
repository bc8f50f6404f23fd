"""Checkpoint folders: single file, sharded index (and its hostile variants), unindexed files, pickle."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from adaptkit.errors import CheckpointError, UnsafeFormatError
from adaptkit.io import open_checkpoint


def _index(folder, weight_map, **extra):
    doc = {"metadata": {}, "weight_map": weight_map, **extra}
    (folder / "model.safetensors.index.json").write_text(json.dumps(doc))


@pytest.fixture
def sharded(tmp_path):
    """A sharded folder written by the reference library: a,b in shard 1, c in shard 2."""
    d = tmp_path / "ck"
    d.mkdir()
    ts = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int32), "c": torch.randn(2).to(torch.bfloat16)}
    save_file({"a": ts["a"], "b": ts["b"]}, d / "s1.safetensors")
    save_file({"c": ts["c"]}, d / "s2.safetensors")
    _index(d, {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"})
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    return d, ts


def _expect(path, *fragments, cls=CheckpointError, **kw):
    with pytest.raises(cls) as ei:
        open_checkpoint(path, **kw)
    msg = str(ei.value)
    assert "\n" not in msg
    for frag in fragments:
        assert frag in msg, msg
    return msg


def test_sharded_index(sharded):
    d, ts = sharded
    with open_checkpoint(d) as ck:
        assert ck.path == d
        assert ck.names() == ["a", "b", "c"]
        assert [p.name for p in ck.files] == ["s1.safetensors", "s2.safetensors"]
        assert ck.config == {"model_type": "llama", "hidden_size": 64}
        assert ck.total_bytes == 48 + 20 + 4
        info = ck.info("c")
        assert (info.dtype, info.shape, info.file.name, info.nbytes) == ("BF16", (2,), "s2.safetensors", 4)
        raw = (d / "s2.safetensors").read_bytes()
        assert raw[info.offset : info.offset + 4] == ts["c"].view(torch.uint8).numpy().tobytes()
        for k, v in ts.items():
            assert torch.equal(ck.get(k), v)
        with pytest.raises(CheckpointError, match="no tensor named 'zz'"):
            ck.get("zz")
        with pytest.raises(CheckpointError, match="no tensor named 'zz'"):
            ck.info("zz")


def test_index_without_weight_map(sharded):
    d, _ = sharded
    (d / "model.safetensors.index.json").write_text('{"metadata": {}}')
    _expect(d, "model.safetensors.index.json", "no 'weight_map'")


def test_index_not_json(sharded):
    d, _ = sharded
    (d / "model.safetensors.index.json").write_text('{"weight_map": ')
    _expect(d, "model.safetensors.index.json", "not valid JSON")


def test_index_duplicate_key(sharded):
    d, _ = sharded
    (d / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "s1.safetensors", "a": "s2.safetensors"}}'
    )
    _expect(d, "duplicate key 'a'")


@pytest.mark.parametrize(
    "rel, rule",
    [
        ("/etc/passwd", "is absolute"),
        ("../outside.safetensors", "contains '..'"),
        ("sub/../../outside.safetensors", "contains '..'"),
        ("missing.safetensors", "does not exist"),
        ("", "non-empty string"),
        (5, "non-empty string"),
        (["s2.safetensors"], "non-empty string"),
        (None, "non-empty string"),
    ],
)
def test_index_bad_shard_paths(sharded, rel, rule):
    d, _ = sharded
    (d.parent / "outside.safetensors").write_bytes((d / "s2.safetensors").read_bytes())
    _index(d, {"a": "s1.safetensors", "b": "s1.safetensors", "c": rel})
    msg = _expect(d, "model.safetensors.index.json", "tensor 'c'", rule)
    if isinstance(rel, str) and rel:
        assert repr(rel) in msg


def test_index_symlink_escape(sharded, tmp_path):
    d, _ = sharded
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.replace(d / "s2.safetensors", outside / "s2.safetensors")
    os.symlink(outside / "s2.safetensors", d / "s2.safetensors")
    _expect(d, "model.safetensors.index.json: tensor 'c'", "'s2.safetensors'", "resolves outside the checkpoint folder")
    # a symlinked sub-folder escapes too
    os.symlink(outside, d / "sub")
    _index(d, {"a": "s1.safetensors", "b": "s1.safetensors", "c": "sub/s2.safetensors"})
    _expect(d, "resolves outside the checkpoint folder")


def test_symlink_inside_folder_is_fine(sharded):
    d, ts = sharded
    (d / "real").mkdir()
    os.replace(d / "s2.safetensors", d / "real" / "s2.safetensors")
    os.symlink("real/s2.safetensors", d / "s2.safetensors")
    with open_checkpoint(d) as ck:
        assert torch.equal(ck.get("c"), ts["c"])


def test_hf_cache_snapshot_symlinks_allowed(tmp_path):
    """HF cache snapshots are symlinks into ../../blobs: that is the layout, not an escape."""
    repo = tmp_path / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    t = torch.randn(4)
    save_file({"w": t}, repo / "blobs" / "deadbeef")
    os.symlink("../../blobs/deadbeef", snap / "model.safetensors")
    with open_checkpoint(snap) as ck:
        assert torch.equal(ck.get("w"), t)


def test_index_mapped_tensor_missing(sharded):
    d, _ = sharded
    _index(d, {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s1.safetensors"})
    _expect(d, "model.safetensors.index.json: tensor 'c' is mapped to 's1.safetensors' but that file does not contain it")


def test_index_tensor_in_two_files(sharded):
    d, _ = sharded
    save_file({"c": torch.zeros(2, dtype=torch.bfloat16), "a": torch.zeros(3, 4)}, d / "s2.safetensors")
    msg = _expect(d, "model.safetensors.index.json: tensor 'a' is stored in two files")
    assert "'s1.safetensors'" in msg and "'s2.safetensors'" in msg


def test_index_unmapped_tensor_reported(sharded):
    d, _ = sharded
    _index(d, {"a": "s1.safetensors", "c": "s2.safetensors"})
    _expect(d, "model.safetensors.index.json: tensor 'b' in 's1.safetensors' is not listed in the weight_map")


def test_corrupt_shard_names_the_shard(sharded):
    d, _ = sharded
    raw = (d / "s2.safetensors").read_bytes()
    (d / "s2.safetensors").write_bytes(raw[:-1])
    _expect(d, "s2.safetensors", "past the end of the data buffer")


def test_single_model_safetensors_and_single_file_path(tmp_path):
    t = {"x": torch.randn(2, 2)}
    save_file(t, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text('{"a": 1}')
    with open_checkpoint(tmp_path) as ck:
        assert ck.names() == ["x"] and ck.config == {"a": 1}
    with open_checkpoint(tmp_path / "model.safetensors") as ck:
        assert torch.equal(ck.get("x"), t["x"])


def test_unindexed_multiple_files(tmp_path):
    save_file({"a": torch.ones(1)}, tmp_path / "part1.safetensors")
    save_file({"b": torch.zeros(2)}, tmp_path / "part2.safetensors")
    with open_checkpoint(tmp_path) as ck:
        assert ck.names() == ["a", "b"]
        assert ck.config is None
    save_file({"a": torch.zeros(1)}, tmp_path / "part3.safetensors")
    _expect(tmp_path, "tensor 'a' appears in two files", "part1.safetensors", "part3.safetensors")


def test_empty_folder_and_missing_path(tmp_path):
    _expect(tmp_path, "no weights found")
    _expect(tmp_path / "nope", "no such file or directory")


def test_bad_config_json(tmp_path):
    save_file({"a": torch.ones(1)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{oops")
    ck = open_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        ck.config


def test_pickle_refused_without_flag(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    msg = _expect(tmp_path, cls=UnsafeFormatError)
    assert msg == (
        f"{tmp_path} contains only pickle weights (pytorch_model.bin); convert to safetensors or pass --allow-pickle"
    )
    _expect(tmp_path / "pytorch_model.bin", "pickle weights", cls=UnsafeFormatError)


def test_pickle_loaded_with_flag_weights_only(tmp_path):
    ts = {"w": torch.randn(3, 2), "b": torch.arange(3).to(torch.bfloat16)}
    torch.save(ts, tmp_path / "model.pt")
    with open_checkpoint(tmp_path, allow_pickle=True) as ck:
        assert set(ck.names()) == {"w", "b"}
        assert ck.info("b").dtype == "BF16" and ck.info("b").nbytes == 6
        for k, v in ts.items():
            assert torch.equal(ck.get(k), v)


def test_pickle_with_code_is_refused_even_with_flag(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"w": Evil()}, tmp_path / "pytorch_model.bin")
    _expect(tmp_path, "weights_only", allow_pickle=True)


def test_safetensors_preferred_over_pickle(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    with open_checkpoint(tmp_path) as ck:
        assert torch.equal(ck.get("w"), torch.zeros(2))


def test_sharded_pickle_index(tmp_path):
    a, b = torch.randn(2), torch.randn(3)
    torch.save({"a": a}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": b}, tmp_path / "pytorch_model-00002-of-00002.bin")
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        "a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}))
    _expect(tmp_path, "pytorch_model-00001-of-00002.bin, pytorch_model-00002-of-00002.bin", cls=UnsafeFormatError)
    with open_checkpoint(tmp_path, allow_pickle=True) as ck:
        assert torch.equal(ck.get("a"), a) and torch.equal(ck.get("b"), b)
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "../x.bin"}}))
    _expect(tmp_path, "tensor 'a'", "contains '..'")
